"""ResNet backbones (torchvision layout, v1.5) in Flax Linen, channels last.

Parameter names follow torchvision so that importing its weights is a key
mapping: ``conv1``, ``bn1``, ``layer{1..4}_{i}`` blocks holding ``conv1..3``,
``bn1..3`` and ``downsample_conv`` / ``downsample_bn``. Per-stage strides are
configurable: ``(1, 2, 2, 2)`` gives output stride 32 (the low-resolution
teacher), ``(1, 2, 1, 1)`` output stride 8 (the high-resolution student),
``(1, 1, 1, 1)`` output stride 4 (re-id: the first block of stages 2-4 at
stride 1).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from brnpa_jax.models.blocks import BasicBlock, BatchNorm, Bottleneck, Conv, conv_init
from brnpa_jax.models.conv import max_pool

LOW_RES_STRIDES = (1, 2, 2, 2)
HIGH_RES_STRIDES = (1, 2, 1, 1)
REID_HIGH_RES_STRIDES = (1, 1, 1, 1)
# What a config's ``res`` means for the ResNet families.
RESOLUTIONS = {"low": {"strides": LOW_RES_STRIDES},
               "high": {"strides": HIGH_RES_STRIDES},
               "reid_high": {"strides": REID_HIGH_RES_STRIDES}}

class ResNet(nn.Module):
  """ResNet feature extractor (no pooling, no classifier).

  Attributes:
    block: ``BasicBlock`` or ``Bottleneck``.
    stage_sizes: number of blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    strides: stride of the first block of each stage; see ``registry.STRIDES``.
    width: channels of the stem and the first stage (64 in torchvision).
    zero_init_residual: start each residual branch at zero (its last BN scale).
    dtype: computation dtype; parameters and BN statistics stay float32.
  """
  block: Callable[..., nn.Module]
  stage_sizes: Sequence[int]
  strides: Sequence[int] = LOW_RES_STRIDES
  width: int = 64
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  # The last stage ends in a ReLU: the features BR-NPA receives are >= 0.
  nonnegative_features = True
  resolutions = RESOLUTIONS

  @property
  def num_features(self) -> int:
    return self.width * 2 ** (len(self.stage_sizes) - 1) * self.block.expansion

  @property
  def output_stride(self) -> int:
    stride = 4  # stem conv + max-pool
    for s in self.strides:
      stride *= s
    return stride

  def feature_grid(self, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of the feature map of an input, without tracing: each
    strided layer (the stem's convolution and max-pool, a stage's first
    block) gives ceil(side / stride)."""
    out = []
    for side in (height, width):
      for s in (2, 2, *self.strides):
        side = -(-side // s)
      out.append(side)
    return tuple(out)

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    """Returns the last stage's post-ReLU feature map (B, H/os, W/os, C)."""
    if len(self.strides) != len(self.stage_sizes):
      raise ValueError(f"strides {tuple(self.strides)} must have one entry per "
                       f"stage {tuple(self.stage_sizes)}.")
    x = x_BxHxWx3.astype(self.dtype)
    x = Conv(self.width, (7, 7), (2, 2), padding=3, use_bias=False,
             dtype=self.dtype, kernel_init=conv_init, name="conv1")(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)
    x = nn.relu(x)
    x = max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, (num_blocks, stride) in enumerate(zip(self.stage_sizes,
                                                     self.strides)):
      for i in range(num_blocks):
        x = self.block(features=self.width * 2 ** stage,
                       stride=stride if i == 0 else 1,
                       zero_init_residual=self.zero_init_residual,
                       dtype=self.dtype,
                       name=f"layer{stage + 1}_{i}")(x, train)
    return x


ResNet18 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 8, 36, 3))
# One basic block per stage, width 8: compiles in seconds, for tests.
ResNetTiny = functools.partial(ResNet, block=BasicBlock, stage_sizes=(1, 1, 1, 1),
                               width=8)
