"""ConvNeXt (Liu et al. 2022) in Flax Linen, channels last, timm's layout.

A p x p stride-p patchify stem (``stem_0`` conv, ``stem_1`` LayerNorm; p =
``patch_size``, timm's argument: 4 in the published networks, 2 or 1 for
small images, same keys), then
four stages. Stages 2-4 open with a downsampling layer (``downsample_0``
LayerNorm, ``downsample_1`` 2x2 conv); every stage stacks blocks of a 7x7
depthwise conv (``conv_dw``), a LayerNorm over channels (``norm``), an MLP
with 4x expansion and exact GELU (``mlp/fc1``, ``mlp/fc2``) and a learned
per-channel layer scale (``gamma``), added to the block's input. The
depthwise conv is ``blocks.Conv``: a plain ``nn.Conv`` whose CPU form is a
sum of shifted slices (``models/conv.py``). Names are
timm's ``convnext_*`` keys with ``stages.1`` written ``stages_1``
(``models/timm_names.py`` maps one onto the other).

Resolution: ``strides`` are the downsampling strides of stages 2-4. ``low``
(2, 2, 2) is the standard output stride 8p, 32 for the published stem
(224 px -> 7x7); ``high`` (2, 1, 1) runs the last two downsampling layers at
stride 1 (output stride 2p, 8 for the published stem: 224 px -> 28x28), as
the ResNets' ``high`` does. A stride-1 2x2
convolution pads one zero row and column at the bottom and right (PyTorch's
and timm's ``'same'`` padding of an even kernel), so the grid stays exactly
H/8 x W/8. No dilation is added: the last stages see fewer input pixels, as
in the ResNets' ``high``. Strides are not weights, so one checkpoint loads
into every resolution.

The last stage's output can be negative (no final ReLU), so
``nonnegative_features = False`` makes ``build_model`` rectify it before the
BR-NPA operator. timm's classifier normalises the pooled vector
(``head.norm``) before its linear layer; ``pooled_norm = True`` makes the
``Classifier`` normalise each pooled vector the same way (``head_norm``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from brnpa_jax.models.blocks import (Conv, ConvStem, DropPath, LayerNorm, Mlp,
                                     conv_stem_side, drop_path_rates,
                                     trunc_normal_init)

LOW_RES_STRIDES = (2, 2, 2)
HIGH_RES_STRIDES = (2, 1, 1)
REID_HIGH_RES_STRIDES = (1, 1, 1)


class ConvNeXtBlock(nn.Module):
  """Depthwise 7x7 conv, LayerNorm, MLP, layer scale, stochastic depth,
  residual sum."""
  ls_init: float = 1e-6
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    y = Conv(c, (7, 7), padding=3, feature_group_count=c, dtype=self.dtype,
             kernel_init=trunc_normal_init, name="conv_dw")(x)
    y = LayerNorm(dtype=self.dtype, name="norm")(y)
    y = Mlp(4 * c, dtype=self.dtype, name="mlp")(y)
    gamma = self.param("gamma", nn.initializers.constant(self.ls_init), (c,))
    return x + DropPath(self.drop_path)(y * gamma.astype(y.dtype), train)


class ConvNeXtStage(nn.Module):
  """An optional downsampling layer (LayerNorm, 2x2 conv), then the blocks."""
  features: int
  depth: int
  stride: int | None  # None: no downsampling layer (the first stage)
  ls_init: float = 1e-6
  drop_paths: Sequence[float] = ()  # per block; () is none
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stride is not None:
      x = LayerNorm(dtype=self.dtype, name="downsample_0")(x)
      pad = "VALID" if self.stride == 2 else ((0, 1), (0, 1))
      x = nn.Conv(self.features, (2, 2), (self.stride, self.stride),
                  padding=pad, dtype=self.dtype, kernel_init=trunc_normal_init,
                  name="downsample_1")(x)
    rates = self.drop_paths or (0.0,) * self.depth
    for i in range(self.depth):
      x = ConvNeXtBlock(self.ls_init, rates[i], dtype=self.dtype,
                        name=f"blocks_{i}")(x, train)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt feature extractor (no pooling, no classifier).

  Attributes:
    depths: blocks per stage, e.g. (3, 3, 9, 3) for ConvNeXt-T.
    dims: channels per stage at ``width`` 64, e.g. (96, 192, 384, 768).
    strides: downsampling strides of stages 2-4, each 1 or 2 (module docstring).
    width: channel scale on the ResNets' scale: 64 gives ``dims`` (the
      published network), 16 a quarter of its channels.
    ls_init: initial layer scale (timm's 1e-6).
    patch_size: side and stride of the patchify stem (timm's ``patch_size``):
      4 in the published networks, 2 or 1 for small images.
    drop_path_rate: stochastic depth of the last block (timm's
      ``drop_path_rate``), rising linearly from 0 over all blocks.
    stem: ``patch`` (timm's patchify stem) or ``conv``: ``blocks.ConvStem``
      of stride ``patch_size`` (``stem_conv``) before ``stem_0``, then a 1x1
      conv.
    dtype: computation dtype; parameters stay float32.
  """
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  strides: Sequence[int] = LOW_RES_STRIDES
  width: int = 64
  ls_init: float = 1e-6
  patch_size: int = 4
  drop_path_rate: float = 0.0
  stem: str = "patch"
  dtype: Any = jnp.float32

  # The last stage has no ReLU: BR-NPA rectifies (``registry.build_model``).
  nonnegative_features = False
  # timm's head normalises the pooled vector (``Classifier``'s ``head_norm``).
  pooled_norm = True
  # timm's init of the classifier on top (``Classifier``): std 0.02, zero bias.
  classifier_init = staticmethod(trunc_normal_init)
  # What a config's ``res`` means for this family.
  resolutions = {"low": {"strides": LOW_RES_STRIDES},
                 "high": {"strides": HIGH_RES_STRIDES},
                 "reid_high": {"strides": REID_HIGH_RES_STRIDES}}

  @property
  def channels(self) -> tuple[int, ...]:
    return tuple(max(1, round(d * self.width / 64)) for d in self.dims)

  @property
  def num_features(self) -> int:
    return self.channels[-1]

  @property
  def output_stride(self) -> int:
    """Input pixels per feature-grid cell: the stem's patch x the strides."""
    return self.patch_size * math.prod(self.strides)

  def feature_grid(self, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of the feature map of an input, without tracing: the
    unpadded patchify stem and stride-2 layers floor each side (a conv stem's
    padded 3x3 convolutions round up), stride-1 layers keep it."""
    def side(n):
      if self.stem == "conv":
        n = conv_stem_side(n, self.patch_size)
      else:
        n //= self.patch_size
      for s in self.strides:
        n //= s
      return n
    return side(height), side(width)

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    """Returns the last stage's feature map (B, H/os, W/os, C); ``train``
    turns stochastic depth on and a conv stem's BatchNorm to batch
    statistics."""
    if len(self.strides) != len(self.depths) - 1 or not set(self.strides) <= {1, 2}:
      raise ValueError(f"ConvNeXt strides {tuple(self.strides)}: one stride, "
                       f"1 or 2, per downsampling layer ({len(self.depths) - 1}).")
    h, w = x_BxHxWx3.shape[1:3]
    if min(self.feature_grid(h, w)) < 1:
      raise ValueError(f"Input {h}x{w} is smaller than ConvNeXt's output "
                       f"stride {self.output_stride}; use larger images.")
    x = x_BxHxWx3.astype(self.dtype)
    p = self.patch_size
    if self.stem == "conv":
      x = ConvStem(self.channels[0], p, dtype=self.dtype, name="stem_conv")(
          x, train)
      p = 1
    x = nn.Conv(self.channels[0], (p, p), (p, p), padding="VALID",
                dtype=self.dtype, kernel_init=trunc_normal_init, name="stem_0")(x)
    x = LayerNorm(dtype=self.dtype, name="stem_1")(x)
    rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
    for i, (depth, c) in enumerate(zip(self.depths, self.channels)):
      stride = None if i == 0 else self.strides[i - 1]
      first = sum(self.depths[:i])
      x = ConvNeXtStage(c, depth, stride, self.ls_init,
                        tuple(rates[first:first + depth]), dtype=self.dtype,
                        name=f"stages_{i}")(x, train)
    return x


ConvNeXtTiny = functools.partial(ConvNeXt, depths=(3, 3, 9, 3),
                                 dims=(96, 192, 384, 768))
ConvNeXtSmall = functools.partial(ConvNeXt, depths=(3, 3, 27, 3),
                                  dims=(96, 192, 384, 768))
ConvNeXtBase = functools.partial(ConvNeXt, depths=(3, 3, 27, 3),
                                 dims=(128, 256, 512, 1024))
ConvNeXtLarge = functools.partial(ConvNeXt, depths=(3, 3, 27, 3),
                                  dims=(192, 384, 768, 1536))
# One block per stage, the ResNets' stage widths: compiles in seconds, for
# tests (``runlocal``'s width 8 gives 8-16-32-64 channels).
ConvNeXtTest = functools.partial(ConvNeXt, depths=(1, 1, 1, 1),
                                 dims=(64, 128, 256, 512))
