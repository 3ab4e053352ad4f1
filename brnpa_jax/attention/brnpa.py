"""The BR-NPA operator: non-parametric, ranked attention over a feature map.

For one image's feature map ``F`` (H, W, C) the operator repeats K times:
pick the most active position not yet represented, group the positions
cosine-similar to it into an attention map, and suppress them. The K refined
representative vectors are the map-weighted sums of the features, computed in
one matmul once all maps are known. See ``SPEC.md`` section 1.

Memory traffic: one pass over the features for the norms, one matrix-vector
product per round, and one (K, N) x (N, C) matmul at the end, so K + 2 reads
of the features in all and O(N * C) memory; no (N, N) similarity matrix.
The gradient is a custom VJP that reads the features three more times and
writes the result once (``_brnpa_flat_bwd``); as a consequence the operator
supports reverse-mode autodiff (any order) but not forward mode (``jax.jvp``).

The core works on one example (``brnpa_single``) and is batched with
``jax.vmap`` (``brnpa``).
"""

from __future__ import annotations

import functools
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


def _select_and_weigh(x_NxC, scores_KxN, num_maps, refine):
  """The forward pass on flattened features; returns outputs and residuals.

  ``scores_KxN`` holds the per-round random scores of ``init='random'``, or is
  None to select by norm.
  """
  x32_NxC = x_NxC.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  r_N = _safe_norm(x32_NxC)
  n_N = r_N + NORM_EPS
  rounds = jnp.arange(num_maps)

  def round_fn(suppress_N, k):
    base_N = n_N if scores_KxN is None else scores_KxN[k]
    j = jnp.argmax(suppress_N * base_N)
    s_N = jnp.dot(x32_NxC, x32_NxC[j], precision=hi) / (n_N * n_N[j])
    return suppress_N * (1.0 - s_N), (j, s_N)

  _, (idx_K, s_KxN) = jax.lax.scan(round_fn, jnp.ones_like(n_N), rounds)
  total_K = jnp.sum(s_KxN, axis=1)
  maps_KxN = jax.vmap(_normalise)(s_KxN)

  if not refine:
    vectors = x_NxC[idx_K]
  elif x_NxC.dtype == jnp.float32:
    # One matmul for all K refined vectors: the (K+2)-th and last feature read.
    vectors = jnp.dot(maps_KxN, x32_NxC, precision=hi)
  else:
    vectors = jnp.dot(maps_KxN.astype(x_NxC.dtype), x_NxC,
                      preferred_element_type=jnp.float32).astype(x_NxC.dtype)
  out = (vectors, maps_KxN, n_N, idx_K.astype(jnp.int32))
  return out, (x_NxC, r_N, n_N, s_KxN, total_K, maps_KxN, idx_K)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _brnpa_flat(x_NxC, scores_KxN, num_maps, refine):
  """(vectors, maps_KxN, norms_N, indices_K) of (N, C) features."""
  return _select_and_weigh(x_NxC, scores_KxN, num_maps, refine)[0]


def _brnpa_flat_fwd(x_NxC, scores_KxN, num_maps, refine):
  out, res = _select_and_weigh(x_NxC, scores_KxN, num_maps, refine)
  return out, (res, scores_KxN)


def _brnpa_flat_bwd(num_maps, refine, saved, cts):
  """Gradient w.r.t. the features: one write, three reads (two unrefined).

  Autodiff of the forward scan would carry an (N, C) gradient through the K
  rounds and materialise outer products: several feature-sized reads and
  writes per round (3-4x slower at 8x56x56x2048 on CPU). Here all (K, N)
  and (K, C) terms are formed first and every feature-sized term is summed
  in one elementwise pass. The reads: ``X G^T`` (what the vectors pass back
  to the maps), ``dS X`` (the selected rows' share of each similarity) and
  the pass that writes the gradient. As in the paper, the selection
  (argmax) and the suppression pass no gradient; the random scores get
  zeros.
  """
  del num_maps
  (x_NxC, r_N, n_N, s_KxN, total_K, maps_KxN, idx_K), scores_KxN = saved
  g_vec, g_maps_KxN, g_norms_N, _ = cts
  hi = jax.lax.Precision.HIGHEST
  x32_NxC = x_NxC.astype(jnp.float32)
  g_vec32 = g_vec.astype(jnp.float32)

  g_a_KxN = g_maps_KxN
  if refine:  # v_k = sum_i a_ki x_i
    # A broadcast-and-reduce compiles to one streaming pass on CPU; the
    # equivalent (K, C) x (C, N) dot packs X first and runs ~2x slower.
    g_a_KxN = g_a_KxN + jnp.sum(x32_NxC[None] * g_vec32[:, None], axis=-1)
  # a = s / sum(s); the guard of _normalise passes no gradient at sum 0.
  ok_K = total_K != 0
  c_K = jnp.sum(g_a_KxN * maps_KxN, axis=1)
  g_s_KxN = jnp.where(ok_K[:, None], (g_a_KxN - c_K[:, None])
                      / jnp.where(ok_K, total_K, 1.0)[:, None], 0.0)
  # s_ki = <x_i, x_j> / (n_i n_j) with j = j_k: both factors of the dot and
  # both norms receive gradient (twice over when i == j).
  nj_K = n_N[idx_K]
  g_dot_KxN = g_s_KxN / (n_N[None, :] * nj_K[:, None])
  gs_s_KxN = g_s_KxN * s_KxN
  g_n_N = g_norms_N - jnp.sum(gs_s_KxN, axis=0) / n_N
  g_n_N = g_n_N.at[idx_K].add(-jnp.sum(gs_s_KxN, axis=1) / nj_K)
  g_rows_KxC = jnp.dot(g_dot_KxN, x32_NxC, precision=hi)
  if not refine:  # v_k = x_jk
    g_rows_KxC = g_rows_KxC + g_vec32
  # n = ||x|| + eps; the safe norm has zero gradient at the origin.
  nz_N = r_N > 0
  coef_N = jnp.where(nz_N, g_n_N / jnp.where(nz_N, r_N, 1.0), 0.0)

  # The pass that writes the gradient, per row i:
  #   coef_i x_i + sum_k g_dot_ki x_jk + sum_k a_ki g_k,
  # then the K selected rows get g_rows in place. The per-row weights are
  # packed as (M, N) so that each is a contiguous row: with an (N, M) layout
  # XLA transposed them inside the fusion, per element (measured 2x slower).
  weights_MxN = [coef_N[None], g_dot_KxN]
  rows_MxC = [x32_NxC[idx_K]]
  if refine:
    weights_MxN.append(maps_KxN)
    rows_MxC.append(g_vec32)
  w_MxN = jnp.concatenate(weights_MxN, axis=0)
  u_MxC = jnp.concatenate(rows_MxC, axis=0)
  g_x_NxC = w_MxN[0][:, None] * x32_NxC
  for m in range(u_MxC.shape[0]):  # M = 2K or K, static: one loop fusion
    g_x_NxC = g_x_NxC + w_MxN[m + 1][:, None] * u_MxC[m][None, :]
  g_x_NxC = g_x_NxC.at[idx_K].add(g_rows_KxC)
  g_scores = None if scores_KxN is None else jnp.zeros_like(scores_KxN)
  return g_x_NxC.astype(x_NxC.dtype), g_scores


_brnpa_flat.defvjp(_brnpa_flat_fwd, _brnpa_flat_bwd)


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
  scores_KxN = None
  if init == "random":
    keys = jax.random.split(rng, num_maps)
    scores_KxN = jax.vmap(lambda k: jax.random.uniform(k, (h * w,)))(keys)
  vectors, maps_KxN, n_N, idx_K = _brnpa_flat(
      feats_HxWxC.reshape(h * w, c), scores_KxN, num_maps, refine)
  return BRNPAOutput(vectors=vectors,
                     maps=maps_KxN.reshape(num_maps, h, w),
                     norms=n_N.reshape(h, w),
                     indices=idx_K)


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
