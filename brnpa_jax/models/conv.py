"""Convolution and max pooling for the model zoo, in forms fast on the CPU.

``conv_general_dilated`` has the signature of ``jax.lax.conv_general_dilated``
and is passed to ``flax.linen.Conv(conv_general_dilated=...)``, so parameters,
checkpoints and imported weights are those of a plain ``nn.Conv``.

A pointwise convolution (1x1 kernel, channels-last, no padding or dilation,
one feature group) is a matmul over the channels of the (strided) input.
XLA:CPU runs convolutions with Eigen's spatial convolution and matmuls with
its own tuned kernels; as a matmul, a ResNet-50 1x1 convolution's forward and
backward run 2x to 4.5x faster on a 2-core CPU (``benchmarks/README.md``).
The matmul form is chosen with ``jax.lax.platform_dependent`` and applies to
the CPU only: other backends keep the convolution, which their compilers map
to the same GEMMs already (cuDNN, or a dot on TPU). Results agree with the
convolution to float32 rounding (different summation order).

A depthwise convolution (one feature group per channel, stride 1, no
dilation: ConvNeXt's 7x7) is, on the CPU, a sum of the kernel's shifted
slices of the padded input, each scaled per channel: XLA:CPU has no tuned
kernel for grouped convolutions, forward or backward. On ConvNeXt-T's grids
(width 10, 64 px, batch 64) the sum's forward and backward are 2.1x to 3.6x
faster, the tiny ConvNeXt's train step 1.9x and its inference 3.4x; the
price is compile time, 11 s -> 50 s for that train step (49 slices per
convolution; ``benchmarks/README.md``).

``max_pool`` is ``flax.linen.max_pool`` whose CPU form is a maximum of
strided slices, for a cheaper backward pass, with ``reduce_window``'s
gradient on tied maxima (see its docstring).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_unit(values) -> bool:
  return values is None or all(v == 1 for v in values)


def _no_padding(padding, ndim: int) -> bool:
  if isinstance(padding, str):  # 'SAME' or 'VALID': neither pads a 1x1 kernel
    return padding.upper() in ("SAME", "VALID")
  return all(tuple(p) == (0, 0) for p in padding) and len(padding) == ndim


def _pointwise(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
               dimension_numbers, feature_group_count,
               batch_group_count) -> bool:
  """Whether this convolution is a channels-last 1x1 matmul."""
  if lhs.ndim != 4 or rhs.shape[:2] != (1, 1):
    return False
  if feature_group_count != 1 or batch_group_count != 1:
    return False
  if not (_is_unit(lhs_dilation) and _is_unit(rhs_dilation)):
    return False
  if not _no_padding(padding, 2):
    return False
  return _channels_last(lhs, rhs, dimension_numbers) and len(window_strides) == 2


def _channels_last(lhs, rhs, dimension_numbers) -> bool:
  """Whether the layout is NHWC / HWIO / NHWC (lax's default, None, is NCHW)."""
  if dimension_numbers is None:
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


def _depthwise(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
               dimension_numbers, feature_group_count,
               batch_group_count) -> bool:
  """Whether this convolution is a channels-last, stride-1 depthwise one."""
  if lhs.ndim != 4 or isinstance(padding, str):
    return False
  if not _channels_last(lhs, rhs, dimension_numbers):
    return False
  c = lhs.shape[-1]
  return (c > 1 and feature_group_count == c and batch_group_count == 1
          and rhs.shape[2:] == (1, c) and _is_unit(window_strides)
          and _is_unit(lhs_dilation) and _is_unit(rhs_dilation)
          and len(padding) == 2)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1,
                         precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated``; on the CPU a 1x1 kernel runs as a matmul
  and a depthwise kernel as a sum of shifted slices."""
  conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count)
  if _depthwise(*args):
    return lax.platform_dependent(
        lhs, rhs, cpu=functools.partial(_shifted_sum, padding=padding,
                                        preferred_element_type=preferred_element_type),
        default=conv)
  if not _pointwise(*args):
    return conv(lhs, rhs)
  sh, sw = window_strides

  def matmul(x_BxHxWxC, w_1x1xCxD):
    if (sh, sw) != (1, 1):
      x_BxHxWxC = x_BxHxWxC[:, ::sh, ::sw, :]
    return lax.dot_general(x_BxHxWxC, w_1x1xCxD[0, 0], (((3,), (0,)), ((), ())),
                           precision=precision,
                           preferred_element_type=preferred_element_type)

  return lax.platform_dependent(lhs, rhs, cpu=matmul, default=conv)


def _shifted_sum(x_BxHxWxC, w_KhxKwx1xC, *, padding, preferred_element_type):
  """A stride-1 depthwise convolution as a per-channel weighted sum of the
  padded input's shifted slices (one per kernel tap)."""
  kh, kw = w_KhxKwx1xC.shape[:2]
  (pt, pb), (pl, pr) = (tuple(p) for p in padding)
  b, h, w, c = x_BxHxWxC.shape
  ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
  dtype = preferred_element_type or jnp.result_type(x_BxHxWxC, w_KhxKwx1xC)
  # Half-precision inputs are summed in float32, as the convolution does.
  acc = jnp.promote_types(dtype, jnp.float32)
  x = jnp.pad(x_BxHxWxC, ((0, 0), (pt, pb), (pl, pr), (0, 0))).astype(acc)
  w_ = w_KhxKwx1xC.astype(acc)
  out = None
  for i in range(kh):
    for j in range(kw):
      term = lax.slice(x, (0, i, j, 0), (b, i + ho, j + wo, c)) * w_[i, j, 0]
      out = term if out is None else out + term
  return out.astype(dtype)


def max_pool(x_BxHxWxC: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """``flax.linen.max_pool`` (channels last, explicit padding with -inf).

  On the CPU it is the elementwise maximum of the window's strided slices:
  XLA:CPU differentiates ``reduce_window`` with a select-and-scatter that is
  6x slower (3x3 / 2 pooling of 4x112x112x64: 45 ms vs 7.5 ms forward and
  backward). The values are identical, and so are the gradients, ties
  included: a custom JVP (forward mode works too) gives each window's
  tangent, and so its gradient, to its first maximum in the window's
  row-major scan order, the position that ``reduce_window``'s
  select-and-scatter (``select_prim=ge``) picks. Without it,
  ``jnp.maximum`` would share the gradient among tied maxima, and a
  spatially constant input (Integrated Gradients' black baseline, after the
  stem's ReLU) would get another input gradient on the CPU than on a GPU or
  TPU. Other backends keep ``reduce_window``.
  """
  (wh, ww), (sh, sw) = tuple(window), tuple(strides)
  padding = tuple(tuple(p) for p in padding)

  def reduce_window(x):
    return nn.max_pool(x, (wh, ww), (sh, sw), padding=padding)

  def taps(x_padded, ho, wo):
    """The window's strided slices of the padded input, in scan order."""
    b, _, _, c = x_padded.shape
    for i in range(wh):
      for j in range(ww):
        yield i, j, lax.slice(x_padded, (0, i, j, 0),
                              (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                              (1, sh, sw, 1))

  def grid(x):
    _, h, w, _ = x.shape
    return ((h + sum(padding[0]) - wh) // sh + 1,
            (w + sum(padding[1]) - ww) // sw + 1)

  def pad(x, value):
    return jnp.pad(x, ((0, 0),) + padding + ((0, 0),), constant_values=value)

  def maximum(x):
    out = None
    for _, _, s in taps(pad(x, -jnp.inf), *grid(x)):
      out = s if out is None else jnp.maximum(out, s)
    return out

  @jax.custom_jvp
  def slices(x):
    return maximum(x)

  @slices.defjvp
  def _first_maximum_jvp(primals, tangents):
    # Each window's tangent is that of its first maximum in scan order; its
    # transpose (reverse mode) sends the window's gradient there alone.
    (x,), (t,) = primals, tangents
    out = maximum(x)
    ho, wo = grid(x)
    t_out = jnp.zeros(out.shape, t.dtype)
    # In reverse scan order, so the first maximum is written last.
    for (_, _, s), (_, _, ts) in reversed(list(zip(taps(pad(x, -jnp.inf), ho, wo),
                                                   taps(pad(t, 0), ho, wo)))):
      t_out = jnp.where(s == out, ts, t_out)
    return out, t_out

  return lax.platform_dependent(x_BxHxWxC, cpu=slices, default=reduce_window)
