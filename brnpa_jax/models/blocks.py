"""Layers shared by the model zoo: convolution, BatchNorm, residual blocks, and
the LayerNorm and MLP of the ConvNeXt and ViT blocks.

Parameter names follow torchvision (``conv1..3``, ``bn1..3``,
``downsample_conv`` / ``downsample_bn``) and timm (``mlp/fc1``, ``mlp/fc2``),
so that importing their weights is a key mapping (``models/weights.py``,
``models/timm_names.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brnpa_jax.models.conv import conv_general_dilated

# torchvision's BatchNorm: momentum 0.1 on the new value, eps 1e-5.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# nn.Conv whose 1x1 kernels run as matmuls on the CPU (see models/conv.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class ResidualBlock(nn.Module):
  """What the residual blocks share: attributes, layer factories, shortcut."""
  features: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  def _layers(self, train: bool):
    """``(conv, norm, scale_init of the branch's last BN)`` factories."""
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=conv_init)
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             dtype=self.dtype)
    last_scale = (nn.initializers.zeros if self.zero_init_residual
                  else nn.initializers.ones)
    return conv, norm, last_scale

  def _shortcut(self, x, out: int, conv, norm):
    """Identity, or a strided 1x1 conv + BN where the shape changes."""
    if x.shape[-1] == out and self.stride == 1:
      return x
    x = conv(out, (1, 1), (self.stride, self.stride), name="downsample_conv")(x)
    return norm(name="downsample_bn")(x)


class BasicBlock(ResidualBlock):
  """Two 3x3 convolutions (ResNet-18/34, and the B-CNN attention branch)."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm, last_scale = self._layers(train)
    s = (self.stride, self.stride)
    y = conv(self.features, (3, 3), s, padding=1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), padding=1, name="conv2")(y)
    y = norm(name="bn2", scale_init=last_scale)(y)
    return nn.relu(self._shortcut(x, self.features, conv, norm) + y)


class Bottleneck(ResidualBlock):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion (ResNet-50+)."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm, last_scale = self._layers(train)
    out = self.features * self.expansion
    y = nn.relu(norm(name="bn1")(conv(self.features, (1, 1), name="conv1")(x)))
    y = conv(self.features, (3, 3), (self.stride, self.stride), padding=1,
             name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3", scale_init=last_scale)(conv(out, (1, 1), name="conv3")(y))
    return nn.relu(self._shortcut(x, out, conv, norm) + y)


# -- pieces of the timm-layout families (ConvNeXt, ViT) ---------------------------
# timm's LayerNorm (ConvNeXt and ViT): eps 1e-6, statistics in float32.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6)


def trunc_normal(std: float, bound: float = 2.0):
  """timm's ``trunc_normal_(std=std)``: a normal cut at +-``bound`` *absolute*.

  JAX's ``truncated_normal(std)`` cuts at +-2 standard deviations (its
  standard deviation is then 0.88 std: 0.0176 for 0.02); timm cuts at +-2 in
  value, far in the tail for small ``std``, so its draws keep ``std``. The cut
  is also kept within 5 standard deviations (std then 0.99999 of ``std``):
  beyond that the inverse-CDF sampler's float32 edge maps a uniform draw of
  exactly -1 to the bound itself (a 100-sigma weight about once per 8 M).
  """
  cut = min(bound / std, 5.0)
  return nn.initializers.truncated_normal(std, lower=-cut, upper=cut)


def torch_default_bias(fan_in: int):
  """PyTorch's default bias of a linear or conv layer: U(+-1/sqrt(fan_in))."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


# timm's initialisation of the ConvNeXt and ViT linear and conv layers (and
# of their classifiers): std 0.02, zero bias.
trunc_normal_init = trunc_normal(0.02)
# PyTorch's default kernel init of a conv layer (kaiming_uniform, a=sqrt(5)):
# U(+-1/sqrt(fan_in)), what timm leaves on a ViT's patch embedding.
torch_default_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Mlp(nn.Module):
  """``fc1`` -> exact GELU -> ``fc2`` on the last axis (timm's ``Mlp``)."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=trunc_normal_init)
    y = nn.gelu(dense(self.hidden, name="fc1")(x), approximate=False)
    return dense(x.shape[-1], name="fc2")(y)


class DropPath(nn.Module):
  """Stochastic depth (timm's ``DropPath``): zeroes a residual branch for whole
  examples with probability ``rate`` and scales the kept ones by
  1 / (1 - rate). Flax's ``Dropout`` broadcast over every axis but the batch;
  it draws from the ``dropout`` rng stream and holds no parameters."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    if not self.rate:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)),
                      deterministic=not train)(x)


def drop_path_rates(rate: float, depth: int) -> list[float]:
  """timm's schedule: rates rising linearly from 0 to ``rate`` over all blocks."""
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


def conv_stem_side(side: int, stride: int, last_stride: int = 2) -> int:
  """One side of ``ConvStem``'s output for an input side, without tracing:
  each 3x3 convolution with one pixel of padding gives ceil(side / s)."""
  n = stride.bit_length() - 1
  for i in range(n):
    side = -(-side // (last_stride if i == n - 1 else 2))
  return side


class ConvStem(nn.Module):
  """A convolutional stem for the transformer-style families (Xiao et al.
  2021, "Early convolutions help transformers see better"): 3x3 convolutions
  (``conv_i``), each with BatchNorm (``bn_i``) and a ReLU, channels doubling
  up to ``features``, one per factor 2 of ``stride``; the caller adds its
  own 1x1 projection. ``last_stride`` 1 keeps the last conv at stride 1 (the
  families' ``res=high``).
  """
  features: int
  stride: int
  last_stride: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    n = self.stride.bit_length() - 1
    if n < 1 or self.stride != 2 ** n:
      raise ValueError("A conv stem needs a stride of 2, 4, 8, ...; got "
                       f"{self.stride}.")
    for i in range(n):
      s = self.last_stride if i == n - 1 else 2
      c = max(8, self.features >> (n - 1 - i))
      x = Conv(c, (3, 3), (s, s), padding=1, use_bias=False, dtype=self.dtype,
               kernel_init=conv_init, name=f"conv_{i}")(x)
      x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype,
                            name=f"bn_{i}")(x))
    return x
