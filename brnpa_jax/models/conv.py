"""Convolution for the model zoo: 1x1 kernels as matmuls on the CPU.

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
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
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
  if dimension_numbers is None:
    return False  # lax's default is NCHW / OIHW
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return want == got and len(window_strides) == 2


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1,
                         precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated``; on the CPU a 1x1 kernel runs as a matmul."""
  conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if not _pointwise(lhs, rhs, window_strides, padding, lhs_dilation,
                    rhs_dilation, dimension_numbers, feature_group_count,
                    batch_group_count):
    return conv(lhs, rhs)
  sh, sw = window_strides

  def matmul(x_BxHxWxC, w_1x1xCxD):
    if (sh, sw) != (1, 1):
      x_BxHxWxC = x_BxHxWxC[:, ::sh, ::sw, :]
    return lax.dot_general(x_BxHxWxC, w_1x1xCxD[0, 0], (((3,), (0,)), ((), ())),
                           precision=precision,
                           preferred_element_type=preferred_element_type)

  return lax.platform_dependent(lhs, rhs, cpu=matmul, default=conv)

