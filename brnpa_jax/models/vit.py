"""Vision Transformer (Dosovitskiy et al. 2021; DeiT) in Flax Linen, timm's layout.

A convolutional patch embedding (``patch_embed/proj``), a class token
(``cls_token``) and learned position embeddings (``pos_embed``, class token
first), then pre-norm blocks (``norm1``, ``attn/qkv``, ``attn/proj``,
``norm2``, ``mlp/fc1``, ``mlp/fc2``; exact GELU, LayerNorm eps 1e-6) and a
final ``norm``. Names are timm's ``vit_*`` / ``deit_*`` keys with ``blocks.3``
written ``blocks_3`` (``models/timm_names.py``).

The backbone returns the patch tokens after the final norm as a grid
(B, H/s, W/s, C), the class token left out: BR-NPA (and every head) runs on
that grid. The class token still takes part in attention, so pretrained
weights see the sequence they were trained on; attention rollout reads it.

Resolution (``overlap``): ``low`` (1) is the standard non-overlapping patch
grid, stride s = patch size (224 px at /16 -> 14x14); ``high`` (2) runs the
same patch embedding at stride patch/2 with patch/4 zero pixels around the
image (overlapping patches, 224 px at /16 -> 28x28, four times the tokens,
about four times the MLP cost and sixteen times the attention cost).
Independently of ``res``, a larger input gives a finer grid at the same
patch size (448 px at /16 -> 28x28, the usual fine-tuning practice).
Either way the position embeddings, stored at ``pos_grid``, are resampled
to the token grid of each input (bicubic with antialiasing, exactly timm's
``resample_abs_pos_embed``), so one checkpoint serves every resolution.

Each block's attention weights (B, heads, N, N), class token first, are
recorded with ``sow`` in the ``intermediates`` collection (nothing is kept
unless ``apply`` is given ``mutable=['intermediates']``); attention rollout
(``explain.explainers``) reads them.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from brnpa_jax.models.blocks import (ConvStem, DropPath, LayerNorm, Mlp,
                                     conv_stem_side, drop_path_rates,
                                     torch_default_bias, torch_default_kernel,
                                     trunc_normal_init)

NUM_PREFIX_TOKENS = 1  # the class token


def resample_pos_embed(pos_1xNxC, old_grid: Sequence[int],
                       new_grid: Sequence[int]) -> jax.Array:
  """Position embeddings for another token grid, as timm resamples them.

  The class token's embedding is kept; the grid's is resized bicubically
  with antialiasing (half-pixel centres), which equals timm's
  ``resample_abs_pos_embed`` (PyTorch ``interpolate(mode='bicubic',
  antialias=True)``), upsampling and downsampling alike.

  Args:
    pos_1xNxC: (1, 1 + gh * gw, C) embeddings of a (gh, gw) = ``old_grid``.
    old_grid: the grid they were stored for.
    new_grid: the grid wanted.

  Returns:
    (1, 1 + h * w, C) embeddings, float32.
  """
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  pos = pos_1xNxC.astype(jnp.float32)
  if old_grid == new_grid:
    return pos
  prefix, grid = pos[:, :NUM_PREFIX_TOKENS], pos[:, NUM_PREFIX_TOKENS:]
  c = pos.shape[-1]
  grid = jax.image.resize(grid.reshape(1, *old_grid, c), (1, *new_grid, c),
                          "cubic", antialias=True)
  return jnp.concatenate([prefix, grid.reshape(1, -1, c)], axis=1)


class Attention(nn.Module):
  """Multi-head self-attention; records its weights as ``attention``."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxC):
    b, n, c = x_BxNxC.shape
    d = c // self.num_heads
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=trunc_normal_init)
    qkv = dense(3 * c, name="qkv")(x_BxNxC).reshape(b, n, 3, self.num_heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, d)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) * d ** -0.5
    attn_BxHxNxN = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attention", attn_BxHxNxN)
    y = jnp.einsum("bhqk,bkhd->bqhd", attn_BxHxNxN.astype(v.dtype), v)
    return dense(c, name="proj")(y.reshape(b, n, c))


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)),
  each branch under stochastic depth ``drop_path``."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    y = Attention(self.num_heads, dtype=self.dtype, name="attn")(
        LayerNorm(dtype=self.dtype, name="norm1")(x))
    x = x + DropPath(self.drop_path)(y, train)
    y = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")(
        LayerNorm(dtype=self.dtype, name="norm2")(x))
    return x + DropPath(self.drop_path)(y, train)


class PatchEmbed(nn.Module):
  """The patch embedding, ``stem='patch'``: one p x p convolution (``proj``)
  at stride p/overlap, with PyTorch's default initialisation (timm leaves it
  so): kernel and bias uniform in +-1/sqrt(fan_in). ``stem='conv'``: a
  convolutional tokenizer, ``blocks.ConvStem`` (``conv_i``, ``bn_i``) of the
  same stride, then a 1x1 ``proj``."""
  features: int
  patch_size: int
  overlap: int = 1
  stem: str = "patch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    p, o = self.patch_size, self.overlap
    if p % o or (p - p // o) % 2:
      raise ValueError(f"A {p}-pixel patch cannot overlap {o}-fold (its "
                       "stride and padding must be whole pixels).")
    if self.stem == "conv":
      x = ConvStem(self.features, p, last_stride=2 // o, dtype=self.dtype,
                   name="stem")(x, train)
      p = o = 1  # the 1x1 projection below
    pad = (p - p // o) // 2
    return nn.Conv(self.features, (p, p), (p // o, p // o),
                   padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                   kernel_init=torch_default_kernel,
                   bias_init=torch_default_bias(p * p * x.shape[-1]),
                   name="proj")(x)


class VisionTransformer(nn.Module):
  """ViT / DeiT feature extractor: patch tokens as a grid (no classifier).

  Attributes:
    patch_size: side of a patch in pixels.
    embed_dim: token width at ``width`` 64 (384 for ViT-S, 768 for ViT-B).
    depth: number of blocks.
    num_heads: attention heads (kept when ``width`` scales the token width).
    img_size: the image side the position embeddings are stored for
      (timm's ``img_size``: 224 for the ``*_224`` models), a grid of
      ``pos_grid`` = img_size / patch_size on each side.
    overlap: 1: patches side by side; 2: stride patch/2 (module docstring).
    width: channel scale on the ResNets' scale: 64 gives ``embed_dim`` (the
      published network), 16 a quarter of it (rounded to a multiple of
      ``num_heads``).
    mlp_ratio: MLP hidden width / token width.
    drop_path_rate: stochastic depth of the last block (timm's
      ``drop_path_rate``), rising linearly from 0 over the blocks.
    stem: ``patch`` (timm's patch embedding) or ``conv`` (a convolutional
      tokenizer of the same stride, ``PatchEmbed``).
    dtype: computation dtype; parameters stay float32, attention weights
      are computed in float32.
  """
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  img_size: int = 224
  overlap: int = 1
  width: int = 64
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  stem: str = "patch"
  dtype: Any = jnp.float32

  # Tokens after a LayerNorm take both signs: BR-NPA rectifies them.
  nonnegative_features = False
  # timm's token-pooled ViTs apply the final norm per token, before pooling.
  pooled_norm = False
  # timm's init of the classifier on top (``Classifier``): std 0.02, zero bias.
  classifier_init = staticmethod(trunc_normal_init)
  # What a config's ``res`` means for this family.
  resolutions = {"low": {"overlap": 1}, "high": {"overlap": 2}}

  @property
  def channels(self) -> int:
    heads = self.num_heads
    return max(heads, round(self.embed_dim * self.width / 64 / heads) * heads)

  @property
  def num_features(self) -> int:
    return self.channels

  @property
  def pos_grid(self) -> tuple[int, int]:
    """The token grid the position embeddings are stored for."""
    return (self.img_size // self.patch_size,) * 2

  @property
  def output_stride(self) -> int:
    """Input pixels per token-grid cell."""
    return self.patch_size // self.overlap

  def feature_grid(self, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid of an input, without tracing: the patch
    embedding's padding of (patch - stride) / 2 pixels a side gives
    floor(side / stride) tokens once a side holds a whole patch; a conv
    stem's padded 3x3 convolutions round each side up."""
    if self.stem == "conv":
      return tuple(conv_stem_side(n, self.patch_size, 2 // self.overlap)
                   for n in (height, width))
    if min(height, width) < self.patch_size:
      return 0, 0
    return height // self.output_stride, width // self.output_stride

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    """Returns the patch tokens (B, H/s, W/s, C), s = ``output_stride``;
    ``train`` turns stochastic depth on and a conv stem's BatchNorm to batch
    statistics."""
    h, w = x_BxHxWx3.shape[1:3]
    if min(self.feature_grid(h, w)) < 1:
      raise ValueError(f"Input {h}x{w} is smaller than the ViT's "
                       f"{self.patch_size}-pixel patches; use larger images.")
    c = self.channels
    x = PatchEmbed(c, self.patch_size, self.overlap, self.stem, dtype=self.dtype,
                   name="patch_embed")(x_BxHxWx3.astype(self.dtype), train)
    b, gh, gw, _ = x.shape
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c))
    pos = self.param("pos_embed", trunc_normal_init,
                     (1, NUM_PREFIX_TOKENS + self.pos_grid[0] * self.pos_grid[1], c))
    pos = resample_pos_embed(pos, self.pos_grid, (gh, gw))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype),
                         x.reshape(b, gh * gw, c)], axis=1)
    x = x + pos.astype(x.dtype)
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      x = Block(self.num_heads, self.mlp_ratio, rate, dtype=self.dtype,
                name=f"blocks_{i}")(x, train)
    x = LayerNorm(dtype=self.dtype, name="norm")(x)
    return x[:, NUM_PREFIX_TOKENS:].reshape(b, gh, gw, c)


def _vit(patch_size, embed_dim, depth, num_heads, img_size=224):
  return functools.partial(
      VisionTransformer, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
      num_heads=num_heads, img_size=img_size)


# timm's models of these names (DeiT's non-distilled models are ViTs of the
# same layout; they differ in their training recipe, i.e. their weights).
ViTTiny16 = _vit(16, 192, 12, 3)
ViTSmall16 = _vit(16, 384, 12, 6)
ViTBase16 = _vit(16, 768, 12, 12)
# Two blocks, 8-pixel patches, position embeddings for 64 px: compiles in
# seconds, for tests (``runlocal``'s width 8 gives 32-wide tokens, 4 heads).
ViTTest = _vit(8, 256, 2, 4, img_size=64)
