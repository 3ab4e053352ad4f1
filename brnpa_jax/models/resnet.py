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

from brnpa_jax.models.conv import conv_general_dilated, max_pool

LOW_RES_STRIDES = (1, 2, 2, 2)
HIGH_RES_STRIDES = (1, 2, 1, 1)
REID_HIGH_RES_STRIDES = (1, 1, 1, 1)
STRIDES = {"low": LOW_RES_STRIDES, "high": HIGH_RES_STRIDES,
           "reid_high": REID_HIGH_RES_STRIDES}

# torchvision's BatchNorm: momentum 0.1 on the new value, eps 1e-5.
_BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# nn.Conv whose 1x1 kernels run as matmuls on the CPU (see models/conv.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class _Block(nn.Module):
  """What both residual blocks share: attributes, layer factories, shortcut."""
  features: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  def _layers(self, train: bool):
    """``(conv, norm, scale_init of the branch's last BN)`` factories."""
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_conv_init)
    norm = functools.partial(_BatchNorm, use_running_average=not train,
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


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34)."""
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


class Bottleneck(_Block):
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


class ResNet(nn.Module):
  """ResNet feature extractor (no pooling, no classifier).

  Attributes:
    block: ``BasicBlock`` or ``Bottleneck``.
    stage_sizes: number of blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    strides: stride of the first block of each stage; see ``STRIDES``.
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

  @property
  def num_features(self) -> int:
    return self.width * 2 ** (len(self.stage_sizes) - 1) * self.block.expansion

  @property
  def output_stride(self) -> int:
    stride = 4  # stem conv + max-pool
    for s in self.strides:
      stride *= s
    return stride

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    """Returns the last stage's post-ReLU feature map (B, H/os, W/os, C)."""
    if len(self.strides) != len(self.stage_sizes):
      raise ValueError(f"strides {tuple(self.strides)} must have one entry per "
                       f"stage {tuple(self.stage_sizes)}.")
    x = x_BxHxWx3.astype(self.dtype)
    x = Conv(self.width, (7, 7), (2, 2), padding=3, use_bias=False,
             dtype=self.dtype, kernel_init=_conv_init, name="conv1")(x)
    x = _BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)
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

BACKBONES = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnet_tiny": ResNetTiny,
}

# Few-shot embedding networks; their module reuses ``_Block``, hence down here.
from brnpa_jax.models.resnet12 import RESNET12_BACKBONES  # pylint: disable=g-import-not-at-top,wrong-import-position
BACKBONES.update(RESNET12_BACKBONES)
