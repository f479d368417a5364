"""Fast drop-in pieces for the CPU: convolutions whose matrix multiplies XLA runs well, GroupNorm from
per-channel sums, and max pooling as a reshape and a max; and the two sets of layers a model is built
with (`LAYER_SETS`): these, on a CPU host, and flax's own, on a GPU or TPU host (`jaxnorm.devices`).

XLA's CPU convolution is fast forward and for the input's gradient, but slow for the kernel's gradient
(the weight gradient of a 24-channel 3x3 conv at 32x32 was 40% of a training step, run on one thread)
and for inputs with few channels (the RGB first layer). The input's patches (nine shifted slices of
the padded input, concatenated along channels: im2col) turn both into one matrix multiply, which XLA's
CPU dot kernels run near the machine's speed. `patch_conv` has `lax.conv_general_dilated`'s signature
for the cases `nn.Conv` uses here (NHWC, stride 1, no dilation, one feature group), so it is passed as
`nn.Conv(conv_general_dilated=patch_conv)`: the module, its parameter names, shapes and initialisation
stay exactly those of `nn.Conv`, and checkpoints do not change.

They were measured on XLA:CPU only. On a GPU or TPU, XLA gives flax's convolution and its gradients
to cuDNN or the TPU's convolution unit, while the custom gradient here is an im2col patch array nine
times the activation and has no forward-mode rule (`jax.jvp` fails through it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# im2col forward only where the input has few channels (the first layer's RGB): for wider inputs the
# nine-fold patch array costs more memory traffic than XLA's own forward convolution.
MAX_PATCH_CHANNELS = 8

# nn.Conv's dimension numbers for 2-D NHWC input: lhs (N, C, H, W) positions, rhs (O, I, H, W), out.
_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` for NHWC input and HWIO kernel, stride 1, with fast matrix multiplies.

    1x1 kernels and inputs of at most `MAX_PATCH_CHANNELS` channels: im2col + one dot (JAX differentiates
    the dot). Wider inputs: XLA's convolution, with the kernel's gradient as one dot (`_conv`). Other
    cases (strides, dilation, feature groups) fall back to `lax.conv_general_dilated`.
    """
    kh, kw, cin, cout = rhs.shape
    plain = (lhs.ndim == 4 and tuple(window_strides) == (1, 1) and feature_group_count == 1 and not kwargs
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and tuple(dimension_numbers or ()) == _NHWC_HWIO)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision,
                                        preferred_element_type=_accumulation(lhs), **kwargs).astype(lhs.dtype)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if kh * kw > 1 and cin > MAX_PATCH_CHANNELS:
        return _conv(lhs, rhs, padding, precision)
    return lax.dot_general(_patches(lhs, kh, kw, padding), rhs.reshape(kh * kw * cin, cout),
                           (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=_accumulation(lhs)).astype(lhs.dtype)


def _accumulation(x):
    """bfloat16 inputs (--precision bf16) are multiplied with float32 sums, then rounded once."""
    return jnp.float32 if x.dtype == jnp.bfloat16 else None


def _patches(x, kh, kw, padding):
    """(N, H', W', kh * kw * C): each output position's input window, features in (dy, dx, c) order,
    which matches an HWIO kernel reshaped to (kh * kw * C, O)."""
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    if kh == kw == 1:
        return x
    return jnp.concatenate([x[:, dy:dy + h, dx:dx + w, :] for dy in range(kh) for dx in range(kw)], axis=-1)


def _xla_conv(x, kernel, padding, precision):
    y = lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=precision, preferred_element_type=_accumulation(x))
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, padding, precision):
    """XLA's convolution, forward and for the input's gradient; the kernel's gradient is one dot of the
    output's gradient with the input's patches (measured 2x faster than XLA's at 32x32, batch 64)."""
    return _xla_conv(x, kernel, padding, precision)


def _conv_forward(x, kernel, padding, precision):
    return _xla_conv(x, kernel, padding, precision), (x, kernel)


def _conv_backward(padding, precision, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, padding, precision), x)
    kh, kw, cin, cout = kernel.shape
    patches = _patches(x, kh, kw, padding).reshape(-1, kh * kw * cin)
    # (O, kh*kw*C), then transposed: the wide (kh*kw*C) dimension last is the faster order here.
    kernel_grad = lax.dot_general(g.reshape(-1, cout), patches, (((0,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=_accumulation(x))
    return input_vjp(g)[0], kernel_grad.T.reshape(kernel.shape).astype(kernel.dtype)


_conv.defvjp(_conv_forward, _conv_backward)


# nn.Conv with the fast convolution: the same module, parameters and initialisation.
Conv = functools.partial(nn.Conv, conv_general_dilated=patch_conv)


def max_pool(x, window: int, stride: int):
    """`nn.max_pool(x, (window, window), strides=(stride, stride))` ("VALID"), NHWC.

    Where the windows tile the input (stride == window, the networks' 2x2 pools) it is a reshape
    and a max over the window axes: the same forward, and a gradient JAX derives elementwise (a mask of
    each window's maximum), which XLA fuses. JAX differentiates `reduce_window` instead through a
    reduction that carries int32 indices of every element plus a scatter: about a fifth of a training
    step on the CPU (benchmarks/NOTES.md). The one difference: a window with tied maxima shares the
    gradient between them instead of giving it to one.
    """
    if stride != window:
        return nn.max_pool(x, (window, window), strides=(stride, stride))
    n, h, w, c = x.shape
    h, w = h // window, w // window  # "VALID": a partial window at the edge is dropped
    x = x[:, :h * window, :w * window, :].reshape(n, h, window, w, window, c)
    return x.max(axis=(2, 4))


class GroupNorm(nn.Module):
    """`nn.GroupNorm` over all but the batch axis, channels last: the same parameters (`scale`, `bias`
    per channel), initialisation and outputs up to float32 rounding.

    The statistics are first summed per channel over the spatial axes, then over each group's channels.
    Flax reduces a (N, H, W, groups, channels per group) view at once, a strided reduction XLA's CPU
    code runs more slowly, forward and in the gradient (benchmarks/NOTES.md, section 8).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = None  # the output's; the statistics are float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if self.num_groups < 1 or channels % self.num_groups:
            raise ValueError(f"Number of groups ({self.num_groups}) does not divide the number of channels "
                             f"({channels}).")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        x32 = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        count = channels // self.num_groups * (x.size // (x.shape[0] * channels))  # elements per group

        def group_mean(per_channel_sum):  # (N, C) -> (N, C): each channel gets its group's mean
            groups = per_channel_sum.reshape(-1, self.num_groups, channels // self.num_groups).sum(-1) / count
            return jnp.repeat(groups, channels // self.num_groups, axis=-1)

        mean = group_mean(jnp.sum(x32, spatial))
        var = jnp.maximum(0.0, group_mean(jnp.sum(x32 * x32, spatial)) - mean * mean)  # flax's fast variance
        mean, mul = (a.reshape(a.shape[:1] + (1,) * len(spatial) + a.shape[1:])
                     for a in (mean, lax.rsqrt(var + self.epsilon) * scale))
        return ((x32 - mean) * mul + bias).astype(self.dtype or x.dtype)


def flax_max_pool(x, window: int, stride: int):
    """`nn.max_pool` with `max_pool`'s signature."""
    return nn.max_pool(x, (window, window), strides=(stride, stride))


class LayerSet(NamedTuple):
    """The convolution, max pooling and GroupNorm a model is built with, and how the run's log names them.
    Both sets make the same parameters (names, shapes, initial values): checkpoints are interchangeable."""

    description: str
    conv: Callable[..., nn.Module]  # nn.Conv's arguments
    max_pool: Callable[[jax.Array, int, int], jax.Array]  # (x, window, stride)
    group_norm: Callable[..., nn.Module]  # nn.GroupNorm's arguments


LAYER_SETS = {
    "cpu": LayerSet("cpu-tuned (custom conv gradient, reshape max-pool, GroupNorm from sums)",
                    Conv, max_pool, GroupNorm),
    "flax": LayerSet("flax (nn.Conv, nn.max_pool, nn.GroupNorm)", nn.Conv, flax_max_pool, nn.GroupNorm),
}
