"""The two networks, built from their layer tables in `jaxnorm.networks`, with the norm chosen once by
name and injected, and the layers chosen once for the platform; and the model summary table.

CifarCNN (CIFAR-10): 3x3 convs without bias, each followed by norm, ReLU and dropout (ReLU first with
--relu-before-norm, GELU with --activation gelu); 1x1 transitions before 2x2 max pooling; global average
pooling and a 1x1 conv to the logits. 34,872 parameters.

MnistNet (MNIST): convs with bias, each but the last followed by norm, ReLU and channel dropout (whole
feature maps dropped). LayerNorm keeps a per-channel scale and bias, so the count is 10,224 for bn, gn
and ln alike (the reference implementations' elementwise-affine LayerNorm over C, H and W had 74,284).

Both models take their settings as one `Config` (big_vision's `Model(**config.model)` in spirit), so
nothing is declared twice; the input statistics belong to the model so it normalises its own input.
The convolutions, max pooling and GroupNorm come from one of `layers.LAYER_SETS`, chosen by
`build_model` for the platform (`devices.layer_choice`); both make the same parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import layers
from jaxnorm.config import Config, ConfigError
from jaxnorm.devices import LAYER_CHOICES, layer_choice
from jaxnorm.networks import Layer, cifar_cnn, mnist_net

# --precision: the dtype of convolutions and activations.
COMPUTE_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# --activation; nn.gelu is the tanh approximation by default.
ACTIVATION_FUNCTIONS = {"relu": nn.relu, "gelu": nn.gelu}


def norm_layer(norm: str, *, train: bool, groups: int = 8, dtype=jnp.float32,
               group_norm: Callable[..., nn.Module] = nn.GroupNorm) -> Callable[..., nn.Module]:
    """The normalisation layer for `norm`, as a constructor taking only `name=`. `dtype` is its output's;
    Flax computes the statistics in float32 at least. `group_norm`: nn.GroupNorm or `layers.GroupNorm`."""
    if norm == "bn":
        # Running statistics live in the mutable `batch_stats` collection; evaluation uses them.
        return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=dtype)
    if norm == "gn":
        return functools.partial(group_norm, num_groups=groups, epsilon=1e-5, dtype=dtype)
    if norm == "ln":
        # Each sample normalised over C, H and W, with a per-channel scale and bias (the reference
        # implementations' choice; not torch's elementwise-affine LayerNorm over C, H and W).
        return functools.partial(nn.LayerNorm, reduction_axes=(-3, -2, -1), feature_axes=-1, epsilon=1e-5,
                                 dtype=dtype)
    raise ConfigError(f"unknown norm {norm!r}: choose one of bn, gn, ln")


def standardize_kernels(variables: dict) -> dict:
    """Weight standardisation (Qiao et al. 2019): each output channel's kernel (HWIO) to zero mean and
    unit variance over its inputs, so the norm after the conv sees a smoother loss; biases unchanged."""
    def standardize(w):
        if w.ndim != 4:
            return w
        mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
        return (w - mean) * jax.lax.rsqrt(jnp.var(w, axis=(0, 1, 2), keepdims=True) + 1e-5)
    return jax.tree_util.tree_map(standardize, variables)


def normalise_input(images, mean, std):
    """Images in [0, 255] to the network's input: each channel less the training set's mean, over its
    standard deviation (both in [0, 1] units). numpy or jax arrays alike, in the dtype given."""
    return (images / 255.0 - mean) / std


class _LayerNet(nn.Module):
    """Runs `spatial_layers()` in order. Input: uint8 or float NHWC images in [0, 255]; output: logits.

    Each subclass defines `spatial_layers()`: its network's table from `jaxnorm.networks`."""

    config: Config = Config()
    # Per-channel statistics of the training set, in [0, 1] units.
    input_mean: Sequence[float] = (0.0, 0.0, 0.0)
    input_std: Sequence[float] = (1.0, 1.0, 1.0)
    num_classes: int = 10
    # The convolution, max pooling and GroupNorm: a key of `layers.LAYER_SETS` (build_model passes the
    # platform's). Not part of the Config: a run trained with one set resumes or evaluates with the other.
    layer_set: str = "flax"
    use_bias = False  # the convs' bias (class constants, not fields)
    channel_dropout = False  # drop whole feature maps instead of single activations

    @property
    def layer_description(self) -> str:
        """The layer set, as the run's first lines name it."""
        return layers.LAYER_SETS[self.layer_set].description

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        dtype = COMPUTE_DTYPES[c.precision]  # parameters stay float32 (Flax's param_dtype)
        impl = layers.LAYER_SETS[self.layer_set]
        norm = norm_layer(c.norm, train=train, groups=c.groups, dtype=dtype, group_norm=impl.group_norm)
        activation = ACTIVATION_FUNCTIONS[c.activation]
        x = normalise_input(x.astype(jnp.float32), jnp.asarray(self.input_mean), jnp.asarray(self.input_std))
        x = x.astype(dtype)
        for layer in self.spatial_layers():
            if layer.kind in ("block", "conv"):
                k = layer.kernel
                conv = impl.conv
                if c.weight_standardization and layer.kind == "block":  # not c10: no norm follows it
                    conv = nn.map_variables(conv, "params", standardize_kernels, init=self.is_initializing())
                y = conv(layer.features, (k, k), padding=layer.padding, use_bias=self.use_bias, dtype=dtype,
                         name=layer.name)(x)
                if layer.kind == "block":
                    block_norm = norm(name=f"{layer.name}_norm")
                    y = block_norm(activation(y)) if c.relu_before_norm else activation(block_norm(y))
                    y = nn.Dropout(c.dropout, broadcast_dims=(1, 2) if self.channel_dropout else (),
                                   deterministic=not train)(y)
                    if c.skip and x.shape == y.shape:
                        y = x + y
                x = y
            elif layer.kind == "max_pool":
                x = impl.max_pool(x, layer.kernel, layer.stride)
            elif layer.kind == "avg_pool":
                x = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(dtype)
            else:
                raise ValueError(f"unknown layer kind {layer.kind!r}")
        return x.reshape(x.shape[0], -1).astype(jnp.float32)  # the loss and metrics in float32


class CifarCNN(_LayerNet):
    """The CIFAR-10 network; widths from `config.width` and `config.transition_width`."""

    def spatial_layers(self) -> tuple[Layer, ...]:
        return cifar_cnn(self.config.width, self.config.transition_width, self.num_classes)


class MnistNet(_LayerNet):
    """The reference implementations' 10,224-parameter MNIST network. Input: (N, 28, 28, 1) in [0, 255]."""

    input_mean: Sequence[float] = (0.0,)
    input_std: Sequence[float] = (1.0,)
    use_bias = True
    channel_dropout = True

    def spatial_layers(self) -> tuple[Layer, ...]:
        return mnist_net(self.num_classes)


def build_model(config: Config, input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0), *,
                num_classes: int = 10, layer_set: str | None = None) -> nn.Module:
    """The model a config describes (MnistNet for `mnist`, CifarCNN otherwise); `input_mean`/`input_std`
    are the training set's per-channel statistics, in [0, 1] units; `num_classes` the width of the last
    1x1 conv (an image folder's class count); `layer_set` 'cpu' or 'flax' (default: the platform's,
    `devices.layer_choice()`)."""
    config.validate()
    layer_set = layer_choice() if layer_set is None else layer_set
    if layer_set not in LAYER_CHOICES:
        raise ConfigError(f"unknown layer set {layer_set!r}: choose one of {', '.join(LAYER_CHOICES)}")
    if config.dataset == "mnist":
        return MnistNet(config, tuple(input_mean)[:1], tuple(input_std)[:1], num_classes, layer_set)
    return CifarCNN(config, tuple(input_mean), tuple(input_std), num_classes, layer_set)


def init_variables(model: nn.Module, image_shape: Sequence[int], seed: int = 0) -> dict:
    """Parameters (and `batch_stats` for BatchNorm) for one image of `image_shape` (H, W, C). Compiled as
    one program, as in flax's examples: run op by op, each layer's initialisers compile on their own."""
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32))


def whitening_kernel(images: np.ndarray, input_mean, input_std, kernel: int, features: int,
                     eps: float = 5e-4) -> np.ndarray:
    """A (kernel, kernel, C, features) conv kernel that whitens the images' kernel x kernel patches, as
    airbench's first layer: the top features/2 eigenvectors of the patch covariance, each divided by the
    square root of its eigenvalue (+ eps), and their negatives (a ReLU follows, which would keep only
    one sign of each). `images`: (N, H, W, C) in [0, 255], normalised as the model's input is."""
    x = normalise_input(images.astype(np.float64), np.asarray(input_mean), np.asarray(input_std))
    dim = kernel * kernel * x.shape[-1]
    moments, count = np.zeros((dim, dim)), 0
    for chunk in np.array_split(x, -(-len(x) // 500)):  # (n, H', W', C, k, k) -> (n H' W', k k C)
        patches = np.lib.stride_tricks.sliding_window_view(chunk, (kernel, kernel), axis=(1, 2))
        patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim)
        moments, count = moments + patches.T @ patches, count + len(patches)
    covariance = moments / count  # about centred already: the channels are normalised to mean 0
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    top = -(-features // 2)
    if top > dim:
        raise ConfigError(f"a whitened first conv has at most {2 * dim} channels ({dim} patch dimensions, "
                          f"each with its negative), not {features}")
    filters = eigenvectors[:, ::-1][:, :top] / np.sqrt(eigenvalues[::-1][:top] + eps)
    filters = np.concatenate([filters, -filters], axis=1)[:, :features]
    return filters.reshape(kernel, kernel, x.shape[-1], features).astype(np.float32)


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def l1_penalty(params) -> jax.Array:
    """Sum of |w| over every conv kernel (biases and norm scales/offsets excluded)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum((jnp.sum(jnp.abs(w)) for path, w in leaves if is_conv_kernel(path)),
               jnp.zeros((), jnp.float32))


def is_conv_kernel(path) -> bool:
    """Whether a parameter's tree path ends at a conv kernel (not a bias, scale or offset)."""
    return getattr(path[-1], "key", None) == "kernel"


# ----------------------------------------------------------------------------------------------
# The summary table, from the model itself (shapes only: nothing is computed). Flax's nn.tabulate
# gives the same facts as a boxed table of about 90 lines for this network (each module's inputs, each
# parameter's shape and bytes); the run's log wants one line per layer, so this reads flax's captured
# outputs (`capture_intermediates`) instead.


def summary_rows(model: nn.Module, image_shape: Sequence[int]) -> list[dict]:
    """One row per top-level module with parameters, in call order: name, type, output shape, parameters."""
    calls = []  # (name, type) of each top-level submodule call, in order

    def record(module, method):
        top = method == "__call__" and len(module.path) == 1
        if top:
            calls.append((module.name, type(module).__name__))
        return top

    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    _, captured = jax.eval_shape(lambda v: model.apply(v, x, train=False, capture_intermediates=record,
                                                       mutable=["intermediates"]), variables)
    params, outputs = variables["params"], captured["intermediates"]
    rows = []
    for name, kind in calls:
        if name not in params:
            continue  # dropout and other parameter-free modules
        shape = jax.tree_util.tree_leaves(outputs[name]["__call__"])[0].shape
        rows.append({"layer": name, "type": kind, "output_shape": [-1, *shape[1:]],
                     "params": count_params(params[name])})
    return rows


def model_summary(model: nn.Module, image_shape: Sequence[int]) -> str:
    """A torchsummary-like table (layer, type, output shape, parameters) from the model itself."""
    rows = summary_rows(model, image_shape)
    lines = [f"{'layer':<10} {'type':<10} {'output shape':<20} {'params':>8}", "-" * 51]
    lines += [f"{r['layer']:<10} {r['type']:<10} {str(r['output_shape']):<20} {r['params']:>8,}"
              for r in rows]
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                                  train=False))
    stats = count_params(variables.get("batch_stats", {}))
    lines += ["-" * 51, f"{'total trainable parameters':<41} {sum(r['params'] for r in rows):>9,}"]
    if stats:
        lines.append(f"{'BatchNorm running statistics (not trained)':<41} {stats:>9,}")
    return "\n".join(lines)
