"""Fast drop-in pieces for the CPU: convolutions as shifted slices + one matrix multiply, and max
pooling as a reshape and a max.

XLA's CPU convolution (Eigen's spatial convolution) is slow for the seed network's small shapes
(24 channels, 3x3), and slower still in the backward pass. The same convolution written as nine
shifted slices of the padded input concatenated along channels (im2col) and one `dot_general` is
one large matrix multiply forward and two backward, which XLA's CPU dot kernels run near the
machine's matrix-multiply speed. `patch_conv` has `lax.conv_general_dilated`'s signature for the
cases `nn.Conv` uses here (NHWC, stride 1, no dilation, one feature group), so it is passed as
`nn.Conv(conv_general_dilated=patch_conv)`: the module, its parameter names, shapes and
initialisation stay exactly those of `nn.Conv`, and checkpoints do not change.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


# im2col only where the input has few channels (the first layer's RGB): for wider inputs the nine-fold
# patch array costs more memory traffic than it saves, and XLA's own convolution is faster.
MAX_PATCH_CHANNELS = 8

# nn.Conv's dimension numbers for 2-D NHWC input: lhs (N, C, H, W) positions, rhs (O, I, H, W), out.
_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` for NHWC input and HWIO kernel, stride 1, as im2col + one dot.

    Other cases (strides, dilation, feature groups) fall back to `lax.conv_general_dilated`.
    """
    kh, kw, cin, cout = rhs.shape
    # bfloat16 inputs (--precision bf16) are multiplied with float32 sums, then rounded once.
    accumulate = jnp.float32 if lhs.dtype == jnp.bfloat16 else None
    plain = (lhs.ndim == 4 and tuple(window_strides) == (1, 1) and feature_group_count == 1 and not kwargs
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and tuple(dimension_numbers or ()) == _NHWC_HWIO)
    if not plain or (kh * kw > 1 and cin > MAX_PATCH_CHANNELS):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision,
                                        preferred_element_type=accumulate, **kwargs).astype(lhs.dtype)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    (top, bottom), (left, right) = padding
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    n, hp, wp, _ = x.shape
    h, w = hp - kh + 1, wp - kw + 1
    if kh == kw == 1:
        patches = x
    else:  # feature order (dy, dx, cin) matches rhs.reshape(kh * kw * cin, cout)
        patches = jnp.concatenate([x[:, dy:dy + h, dx:dx + w, :] for dy in range(kh) for dx in range(kw)],
                                  axis=-1)
    return lax.dot_general(patches, rhs.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=accumulate).astype(lhs.dtype)


# nn.Conv with the fast convolution: the same module, parameters and initialisation.
Conv = functools.partial(nn.Conv, conv_general_dilated=patch_conv)


def max_pool(x, window: int, stride: int):
    """`nn.max_pool(x, (window, window), strides=(stride, stride))` ("VALID"), NHWC.

    Where the windows tile the input (stride == window, the seed networks' 2x2 pools) it is a reshape
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
