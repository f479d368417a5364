"""The seed CNNs, with the norm layer chosen once by name and injected.

SeedCNN (CIFAR-10), C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10: 3x3 convs (no bias) each followed by
norm, ReLU and dropout; c3/c6 are 1x1 transitions followed by 2x2 max pooling; c10 is a 1x1 conv to the
logits.

MnistNet (MNIST, 10,224 parameters with any norm): convs with bias, each but the last followed by norm,
ReLU and channel dropout; see the class docstring.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm.config import Config, ConfigError


def norm_layer(norm: str, *, train: bool, groups: int = 8) -> Callable[..., nn.Module]:
    """The normalisation layer for `norm`, as a constructor taking only `name=`."""
    if norm == "bn":
        # Running statistics live in the mutable `batch_stats` collection; evaluation uses them.
        return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
    if norm == "gn":
        return functools.partial(nn.GroupNorm, num_groups=groups, epsilon=1e-5)
    if norm == "ln":
        # Each sample normalised over C, H and W, with a per-channel scale and bias (the seeds' choice;
        # not torch's elementwise-affine LayerNorm over C, H and W).
        return functools.partial(nn.LayerNorm, reduction_axes=(-3, -2, -1), feature_axes=-1, epsilon=1e-5)
    raise ConfigError(f"unknown norm {norm!r}: choose one of bn, gn, ln")


class LayerSpec(NamedTuple):
    """One spatial layer, for receptive-field arithmetic. kernel=None: global pooling over the whole map."""

    name: str
    kernel: int | None
    stride: int = 1
    padding: int = 0


class SeedCNN(nn.Module):
    """The seed network. Input: uint8 or float NHWC images in [0, 255]; output: logits."""

    norm: str = "bn"
    groups: int = 8
    width: int = 24
    transition_width: int = 16
    dropout: float = 0.05
    skip: bool = False
    num_classes: int = 10
    # Per-channel statistics of the training set, so the model owns its input normalisation.
    input_mean: Sequence[float] = (0.0, 0.0, 0.0)
    input_std: Sequence[float] = (1.0, 1.0, 1.0)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = norm_layer(self.norm, train=train, groups=self.groups)
        x = (x.astype(jnp.float32) / 255.0 - jnp.asarray(self.input_mean)) / jnp.asarray(self.input_std)

        def conv(x, name):  # 3x3 conv -> norm -> ReLU -> dropout, residual where the shapes allow
            y = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, name=name)(x)
            y = nn.relu(norm(name=f"{name}_norm")(y))
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
            return x + y if self.skip and x.shape[-1] == y.shape[-1] else y

        def transition(x, name):  # 1x1 conv then 2x2 max pool
            x = nn.Conv(self.transition_width, (1, 1), use_bias=False, name=name)(x)
            return nn.max_pool(x, (2, 2), strides=(2, 2))

        # Keep this sequence in step with `spatial_layers` below.
        x = conv(x, "C1")
        x = conv(x, "C2")
        x = transition(x, "c3")  # + P1
        x = conv(x, "C3")
        x = conv(x, "C4")
        x = conv(x, "C5")
        x = transition(x, "c6")  # + P2
        x = conv(x, "C7")
        x = conv(x, "C8")
        x = conv(x, "C9")
        x = jnp.mean(x, axis=(1, 2), keepdims=True)  # GAP
        x = nn.Conv(self.num_classes, (1, 1), use_bias=False, name="c10")(x)
        return x.reshape(x.shape[0], self.num_classes)

    def spatial_layers(self) -> tuple[LayerSpec, ...]:
        """The layer sequence as (name, kernel, stride, padding), for the receptive-field table."""
        def conv(name):
            return LayerSpec(name, 3, 1, 1)

        def one(name):
            return LayerSpec(name, 1, 1, 0)

        return (conv("C1"), conv("C2"), one("c3"), LayerSpec("P1", 2, 2, 0),
                conv("C3"), conv("C4"), conv("C5"), one("c6"), LayerSpec("P2", 2, 2, 0),
                conv("C7"), conv("C8"), conv("C9"), LayerSpec("GAP", None), one("c10"))


class MnistNet(nn.Module):
    """The seeds' 10,224-parameter MNIST network. Input: (N, 28, 28, 1) in [0, 255]; output: logits.

    28x28: conv 1->10 3x3, conv 10->16 3x3, max pool 2, conv 16->8 1x1
    14x14: conv 8->16 3x3, conv 16->16 3x3, conv 16->16 3x3, max pool 2, conv 16->8 1x1
    7x7:   conv 8->10 3x3 valid (->5x5), conv 10->16 3x3 valid (->3x3), conv 16->10 1x1, avg pool 3

    Every conv has a bias and all but the last are followed by norm, ReLU and channel dropout (whole
    feature maps dropped). LayerNorm keeps a per-channel scale and bias, so the count is 10,224 for bn,
    gn and ln alike (the seeds' elementwise-affine LayerNorm over C, H and W had 74,284).
    """

    norm: str = "bn"
    groups: int = 2
    dropout: float = 0.05
    num_classes: int = 10
    input_mean: Sequence[float] = (0.0,)
    input_std: Sequence[float] = (1.0,)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = norm_layer(self.norm, train=train, groups=self.groups)
        x = (x.astype(jnp.float32) / 255.0 - jnp.asarray(self.input_mean)) / jnp.asarray(self.input_std)

        def block(x, features, kernel, name, padding=0):  # conv -> norm -> ReLU -> channel dropout
            x = nn.Conv(features, (kernel, kernel), padding=padding, name=name)(x)
            x = nn.relu(norm(name=f"{name}_norm")(x))
            return nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)

        x = block(x, 10, 3, "conv1", padding=1)
        x = block(x, 16, 3, "conv2", padding=1)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = block(x, 8, 1, "conv3")
        x = block(x, 16, 3, "conv4", padding=1)
        x = block(x, 16, 3, "conv5", padding=1)
        x = block(x, 16, 3, "conv6", padding=1)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = block(x, 8, 1, "conv7")
        x = block(x, 10, 3, "conv8")  # 7 -> 5
        x = block(x, 16, 3, "conv9")  # 5 -> 3
        x = nn.Conv(self.num_classes, (1, 1), name="conv10")(x)
        return jnp.mean(x, axis=(1, 2))  # average pool 3 -> (N, num_classes)

    def spatial_layers(self) -> tuple[LayerSpec, ...]:
        """The layer sequence as (name, kernel, stride, padding), for the receptive-field table."""
        return (LayerSpec("conv1", 3, 1, 1), LayerSpec("conv2", 3, 1, 1), LayerSpec("pool1", 2, 2),
                LayerSpec("conv3", 1), LayerSpec("conv4", 3, 1, 1), LayerSpec("conv5", 3, 1, 1),
                LayerSpec("conv6", 3, 1, 1), LayerSpec("pool2", 2, 2), LayerSpec("conv7", 1),
                LayerSpec("conv8", 3), LayerSpec("conv9", 3), LayerSpec("conv10", 1), LayerSpec("avgpool", None))


def build_model(config: Config, input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0), *,
                num_classes: int = 10) -> nn.Module:
    """The model a config describes (MnistNet for `mnist`, SeedCNN otherwise); `input_mean`/`input_std`
    are the training set's per-channel statistics, in [0, 1] units; `num_classes` the width of the last
    1x1 conv (an image folder's class count)."""
    config.validate()
    if config.dataset == "mnist":
        return MnistNet(norm=config.norm, groups=config.groups, dropout=config.dropout, num_classes=num_classes,
                        input_mean=tuple(input_mean)[:1], input_std=tuple(input_std)[:1])
    return SeedCNN(norm=config.norm, groups=config.groups, width=config.width,
                   transition_width=config.transition_width, dropout=config.dropout, skip=config.skip,
                   num_classes=num_classes, input_mean=tuple(input_mean), input_std=tuple(input_std))


def init_variables(model: nn.Module, image_shape: Sequence[int], seed: int = 0) -> dict:
    """Parameters (and `batch_stats` for BatchNorm) for one image of `image_shape` (H, W, C)."""
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def l1_penalty(params) -> jax.Array:
    """Sum of |w| over every conv kernel (biases and norm scales/offsets excluded)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum((jnp.sum(jnp.abs(w)) for path, w in leaves if getattr(path[-1], "key", None) == "kernel"),
               jnp.zeros((), jnp.float32))
