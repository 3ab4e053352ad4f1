"""Heads: what turns the backbone's feature map into the classifier's input.

Every head maps features (B, H, W, C) to ``(pooled (B, D), aux)`` where aux
holds ``maps`` (B, K, H, W), ``norms`` (B, H, W) and ``vectors`` (B, K, C),
so evaluation and visualisation read every model the same way.

- ``gap``: global average pooling, the plain CNN.
- ``bcnn``: the parametric attention baseline of the BR-NPA release
  ("B-CNN"): a residual basic block (C -> C), a bias-free 1x1 convolution to
  K + 1 channels and a ReLU predict attention maps; the first K maps weight
  the features, each weighted map averaged over space; all K + 1 maps are the
  model's attention (its sparsity and saliency), as in the release. WS-DAN is
  the same idea with 32 maps and a normalised pooled matrix.
- ``brnpa``: the non-parametric operator (``brnpa_jax.attention.brnpa``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brnpa_jax.attention.brnpa import NORM_EPS, brnpa
from brnpa_jax.models.blocks import BasicBlock, Conv


def _norm_map(feats_BxHxWxC):
  x = feats_BxHxWxC.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x * x, axis=-1) + 1e-12)


class GAPHead(nn.Module):
  """Global average pooling (the plain CNN). Its map is the feature norm."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_BxHxWxC, train: bool):
    del train
    pooled = jnp.mean(feats_BxHxWxC.astype(jnp.float32), axis=(1, 2))
    norms = _norm_map(feats_BxHxWxC)
    maps = norms / jnp.sum(norms, axis=(1, 2), keepdims=True)
    aux = {"maps": maps[:, None], "norms": norms, "vectors": pooled[:, None]}
    return pooled.astype(feats_BxHxWxC.dtype), aux


class BilinearAttention(nn.Module):
  """Learned attention maps and the vectors they pool (the B-CNN head's core).

  Attributes:
    num_maps: K, the number of maps used for pooling (K + 1 are predicted, as
      in the release; the last one pools nothing but is part of the model's
      attention).
    dtype: computation dtype.
  """
  num_maps: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_BxHxWxC, train: bool):
    """Returns ``(vectors (B, K, C), maps (B, K + 1, H, W) float32)``."""
    c = feats_BxHxWxC.shape[-1]
    y = BasicBlock(features=c, dtype=self.dtype, name="block")(feats_BxHxWxC, train)
    maps_BxHxWxK1 = nn.relu(Conv(self.num_maps + 1, (1, 1), use_bias=False,
                                 dtype=self.dtype, name="to_maps")(y))
    # Mean over space of (map_k * F): one einsum, no (B, K, H, W, C) tensor.
    n = feats_BxHxWxC.shape[1] * feats_BxHxWxC.shape[2]
    vectors = jnp.einsum("bhwk,bhwc->bkc", maps_BxHxWxK1[..., :self.num_maps],
                         feats_BxHxWxC, preferred_element_type=jnp.float32) / n
    maps = jnp.transpose(maps_BxHxWxK1, (0, 3, 1, 2)).astype(jnp.float32)
    return vectors.astype(feats_BxHxWxC.dtype), maps


class BCNNHead(nn.Module):
  """The parametric attention baseline: K + 1 learned maps (its attention),
  K pooled vectors."""
  num_maps: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_BxHxWxC, train: bool):
    vectors, maps = BilinearAttention(self.num_maps, dtype=self.dtype,
                                      name="attention")(feats_BxHxWxC, train)
    aux = {"maps": maps, "norms": _norm_map(feats_BxHxWxC), "vectors": vectors}
    return vectors.reshape(vectors.shape[0], -1), aux


class BRNPAHead(nn.Module):
  """The non-parametric BR-NPA operator; no parameters of its own.

  Attributes:
    num_maps: K.
    refine: False for the 'no refine' ablation.
    init: 'norm', or 'random' for the random-vectors ablation: each round
      selects the argmax of a fresh uniform draw, without suppression, as
      the authors' release does (it draws from the 'brnpa' rng stream, or a
      fixed key when none is given).
    relu_input: apply a ReLU to the features first. The operator's domain is
      non-negative features (what a CNN stage ending in a ReLU gives);
      ``build_model`` sets this for backbones whose output can be negative.
  """
  num_maps: int = 3
  refine: bool = True
  init: str = "norm"
  relu_input: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_BxHxWxC, train: bool):
    if self.relu_input:
      feats_BxHxWxC = nn.relu(feats_BxHxWxC)
    rng = None
    if self.init == "random":
      rng = (self.make_rng("brnpa") if self.has_rng("brnpa")
             else jax.random.key(0))
    out = brnpa(feats_BxHxWxC, self.num_maps, refine=self.refine,
                init=self.init, rng=rng)
    aux = {"maps": out.maps, "norms": out.norms - NORM_EPS,
           "vectors": out.vectors, "indices": out.indices}
    return out.vectors.reshape(out.vectors.shape[0], -1), aux


HEADS = {"gap": GAPHead, "bcnn": BCNNHead, "brnpa": BRNPAHead}
