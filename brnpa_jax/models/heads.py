"""Heads: what turns the backbone's feature map into the classifier's input.

Every head maps features (B, H, W, C) to ``(pooled (B, D), aux)`` where aux
holds ``maps`` (B, K, H, W), ``norms`` (B, H, W) and ``vectors`` (B, K, C),
so evaluation and visualisation read every model the same way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brnpa_jax.attention.bcnn import BilinearAttention
from brnpa_jax.attention.brnpa import NORM_EPS, brnpa


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


class BCNNHead(nn.Module):
  """The parametric attention baseline: K learned maps, K pooled vectors."""
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
  """
  num_maps: int = 3
  refine: bool = True
  init: str = "norm"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_BxHxWxC, train: bool):
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
