"""ResNet-12: the few-shot embedding network, in Flax Linen, channels last.

Four residual stages; each stage is one block of three 3x3 conv + BN + leaky
ReLU (slope 0.1; the last activation after the residual sum), a 1x1 conv + BN
shortcut, then a 2x2 max-pool. Widths 64-160-320-640 (the common setting of
MetaOptNet and later work) or 64-128-256-512 (``ResNet12Narrow``, the
original TADAM layout). DropBlock, which some recipes add, is left out.

Resolution follows ``registry.STRIDES``, whose entries are the per-stage strides
of a ResNet whose stem already downsamples by 4. ResNet-12 has no stem: its
first stage's pool plays that role and always halves the map, and stage ``i``
pools by ``strides[i]`` on top of it. So ``low`` ``(1, 2, 2, 2)`` pools by 2
after every stage (output stride 16: 84 px -> 5x5, the standard network) and
``high`` ``(1, 2, 1, 1)`` keeps the last two stages at stride 1 (output stride
4: 84 px -> 21x21), the four-fold finer map BR-NPA's few-shot adaptation
uses. Parameter names follow ``resnet``: ``layer{1..4}_0`` blocks with
``conv1..3``, ``bn1..3``, ``downsample_conv`` / ``downsample_bn``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from brnpa_jax.models.blocks import ResidualBlock
from brnpa_jax.models.conv import max_pool
from brnpa_jax.models.resnet import LOW_RES_STRIDES, RESOLUTIONS

LEAKY_SLOPE = 0.1
WIDE_WIDTHS = (64, 160, 320, 640)
NARROW_WIDTHS = (64, 128, 256, 512)


class Block12(ResidualBlock):
  """Three 3x3 conv + BN + leaky ReLU with a 1x1 projection shortcut.

  ``stride`` is the max-pool after the residual sum (1: no pool).
  """

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm, last_scale = self._layers(train)
    act = functools.partial(nn.leaky_relu, negative_slope=LEAKY_SLOPE)
    y = x
    for i in (1, 2):
      y = conv(self.features, (3, 3), padding=1, name=f"conv{i}")(y)
      y = act(norm(name=f"bn{i}")(y))
    y = conv(self.features, (3, 3), padding=1, name="conv3")(y)
    y = norm(name="bn3", scale_init=last_scale)(y)
    # A stride-1 projection (``_shortcut`` would stride it): the pool follows.
    shortcut = norm(name="downsample_bn")(
        conv(self.features, (1, 1), name="downsample_conv")(x))
    y = act(shortcut + y)
    if self.stride > 1:
      y = max_pool(y, (self.stride, self.stride), (self.stride, self.stride))
    return y


class ResNet12(nn.Module):
  """ResNet-12 feature extractor (no pooling, no classifier).

  Attributes:
    strides: ``registry.STRIDES`` entry; see the module docstring.
    width: channels of the first stage; the other stages scale with it
      (64 gives ``stage_widths`` exactly, 8 a tiny network for tests).
    stage_widths: channels of the four stages at ``width`` 64.
    zero_init_residual: start each residual branch at zero (its last BN scale).
    dtype: computation dtype; parameters and BN statistics stay float32.
  """
  strides: Sequence[int] = LOW_RES_STRIDES
  width: int = 64
  stage_widths: Sequence[int] = WIDE_WIDTHS
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  # The last activation is a leaky ReLU: features can be negative, so the
  # BR-NPA head puts a ReLU before the operator (``registry.build_model``).
  nonnegative_features = False
  resolutions = RESOLUTIONS

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(max(1, round(w * self.width / 64)) for w in self.stage_widths)

  @property
  def num_features(self) -> int:
    return self.widths[-1]

  @property
  def pools(self) -> tuple[int, ...]:
    """The max-pool factor after each stage."""
    return tuple(s * (2 if i == 0 else 1) for i, s in enumerate(self.strides))

  @property
  def output_stride(self) -> int:
    stride = 1
    for p in self.pools:
      stride *= p
    return stride

  def feature_grid(self, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of the feature map of an input, without tracing: the
    unpadded max-pools floor each side."""
    return height // self.output_stride, width // self.output_stride

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    """Returns the last stage's feature map (B, H/os, W/os, C)."""
    if len(self.strides) != 4 or len(self.stage_widths) != 4:
      raise ValueError(f"ResNet-12 has four stages; got strides "
                       f"{tuple(self.strides)} and widths {tuple(self.stage_widths)}.")
    h, w = x_BxHxWx3.shape[1:3]
    if min(self.feature_grid(h, w)) < 1:
      raise ValueError(f"Input {h}x{w} is smaller than ResNet-12's output "
                       f"stride {self.output_stride}; use larger images.")
    x = x_BxHxWx3.astype(self.dtype)
    for stage, (features, pool) in enumerate(zip(self.widths, self.pools)):
      x = Block12(features=features, stride=pool,
                  zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                  name=f"layer{stage + 1}_0")(x, train)
    return x


ResNet12Narrow = functools.partial(ResNet12, stage_widths=NARROW_WIDTHS)
