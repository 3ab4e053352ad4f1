"""The BR-NPA operator: non-parametric, ranked attention over a feature map.

For one image's feature map ``F`` (H, W, C) the operator repeats K times:
pick the most active position not yet represented, group the positions
cosine-similar to it into an attention map, and suppress them. The K refined
representative vectors are the map-weighted sums of the features, computed in
one matmul once all maps are known. See ``SPEC.md`` section 1.

Memory traffic: one pass over the features for the norms, one matrix-vector
product per round, and one (K, N) x (N, C) matmul at the end, so K + 2 reads
of the features in all and O(N * C) memory; no (N, N) similarity matrix.

The core works on one example (``brnpa_single``) and is batched with
``jax.vmap`` (``brnpa``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Added to every norm, as in the reference release: keeps the cosine finite
# for all-zero feature vectors.
NORM_EPS = 1e-5

_INITS = ("norm", "random")


class BRNPAOutput(NamedTuple):
  """What the operator returns, ranked in selection order (rank 1 first).

  Attributes:
    vectors: (..., K, C) representative vectors, in the input dtype.
    maps: (..., K, H, W) float32 attention maps; each sums to 1 (or is all
      zero when the features are all zero).
    norms: (..., H, W) float32 active level ``||f|| + 1e-5`` of each position.
    indices: (..., K) int32 flat index ``h * W + w`` of each selected position.
  """

  vectors: jax.Array
  maps: jax.Array
  norms: jax.Array
  indices: jax.Array


def _safe_norm(x_NxC: jax.Array) -> jax.Array:
  """L2 norm over the last axis whose gradient is 0 (not NaN) at the origin."""
  sq = jnp.sum(jnp.square(x_NxC), axis=-1)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _normalise(s_N: jax.Array) -> jax.Array:
  """``s / sum(s)``, giving zeros where the sum is exactly zero."""
  total = jnp.sum(s_N)
  safe = jnp.where(total == 0, 1.0, total)
  return jnp.where(total == 0, 0.0, s_N / safe)


def _check_args(num_maps: int, init: str, rng, refine) -> None:
  if not isinstance(num_maps, int) or num_maps < 1:
    raise ValueError(f"num_maps must be a positive int, got {num_maps!r}.")
  if init not in _INITS:
    raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
  if init == "random" and rng is None:
    raise ValueError("init='random' draws the selection scores at random: "
                     "pass rng=jax.random.key(...).")
  if not isinstance(refine, bool):
    raise TypeError(f"refine must be a Python bool, got {type(refine)}.")


def brnpa_single(feats_HxWxC: jax.Array, num_maps: int, *, refine: bool = True,
                 init: str = "norm", rng: jax.Array | None = None
                 ) -> BRNPAOutput:
  """BR-NPA on one feature map.

  Args:
    feats_HxWxC: feature map of one image, any float dtype (normally the
      post-ReLU output of a CNN stage). Similarities and maps are computed in
      float32.
    num_maps: K, the number of ranked maps (static).
    refine: if True the k-th vector is the map-weighted mean of the features;
      if False it is the selected feature vector itself (ablation).
    init: 'norm' selects by feature norm; 'random' replaces the norm by a
      uniform score redrawn each round (ablation; needs ``rng``).
    rng: PRNG key, only used by ``init='random'``.

  Returns:
    A ``BRNPAOutput`` without a leading batch axis.
  """
  _check_args(num_maps, init, rng, refine)
  if feats_HxWxC.ndim != 3:
    raise ValueError("brnpa_single expects one (H, W, C) feature map, got shape "
                     f"{feats_HxWxC.shape}; use brnpa() for a batch.")
  h, w, c = feats_HxWxC.shape
  x_NxC = feats_HxWxC.reshape(h * w, c)
  x32_NxC = x_NxC.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST

  n_N = _safe_norm(x32_NxC) + NORM_EPS
  if init == "random":
    keys = jax.random.split(rng, num_maps)
  else:
    keys = jnp.zeros((num_maps,), jnp.uint32)  # unused placeholder carried by scan

  def round_fn(suppress_N, key):
    base_N = n_N if init == "norm" else jax.random.uniform(key, n_N.shape)
    # The selection has no gradient, as in the paper.
    j = jnp.argmax(jax.lax.stop_gradient(suppress_N * base_N))
    s_N = jnp.dot(x32_NxC, x32_NxC[j], precision=hi) / (n_N * n_N[j])
    return suppress_N * (1.0 - jax.lax.stop_gradient(s_N)), (j, s_N)

  _, (idx_K, s_KxN) = jax.lax.scan(round_fn, jnp.ones_like(n_N), keys)
  maps_KxN = jax.vmap(_normalise)(s_KxN)

  if refine:
    # One matmul for all K refined vectors: the (K+2)-th and last feature read.
    if x_NxC.dtype == jnp.float32:
      vectors = jnp.dot(maps_KxN, x32_NxC, precision=hi)
    else:
      vectors = jnp.dot(maps_KxN.astype(x_NxC.dtype), x_NxC,
                        preferred_element_type=jnp.float32)
    vectors = vectors.astype(x_NxC.dtype)
  else:
    vectors = x_NxC[idx_K]
  return BRNPAOutput(vectors=vectors,
                     maps=maps_KxN.reshape(num_maps, h, w),
                     norms=n_N.reshape(h, w),
                     indices=idx_K.astype(jnp.int32))


def brnpa(feats_BxHxWxC: jax.Array, num_maps: int, *, refine: bool = True,
          init: str = "norm", rng: jax.Array | None = None) -> BRNPAOutput:
  """BR-NPA on a batch of feature maps (``brnpa_single`` under ``jax.vmap``).

  Jit-compatible with ``num_maps``, ``refine`` and ``init`` static;
  differentiable everywhere except through the (argmax) selection.

  Args:
    feats_BxHxWxC: (B, H, W, C) feature maps, channels last.
    num_maps: K, the number of ranked maps.
    refine: refine the representative vectors (False: 'no refine' ablation).
    init: 'norm' (the paper) or 'random' (ablation, needs ``rng``).
    rng: PRNG key for ``init='random'``; split across the batch.

  Returns:
    ``BRNPAOutput`` with vectors (B, K, C), maps (B, K, H, W), norms (B, H, W)
    and indices (B, K).
  """
  _check_args(num_maps, init, rng, refine)
  if feats_BxHxWxC.ndim != 4:
    raise ValueError("brnpa expects (B, H, W, C) channels-last features, got "
                     f"shape {feats_BxHxWxC.shape}.")
  if not jnp.issubdtype(feats_BxHxWxC.dtype, jnp.floating):
    raise TypeError(f"features must be floating point, got {feats_BxHxWxC.dtype}.")
  if init == "random":
    keys = jax.random.split(rng, feats_BxHxWxC.shape[0])
    fn = lambda f, k: brnpa_single(f, num_maps, refine=refine, init=init, rng=k)
    return jax.vmap(fn)(feats_BxHxWxC, keys)
  fn = lambda f: brnpa_single(f, num_maps, refine=refine, init=init)
  return jax.vmap(fn)(feats_BxHxWxC)
