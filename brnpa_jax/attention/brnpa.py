"""The BR-NPA operator: non-parametric, ranked attention over a feature map.

For one image's feature map ``F`` (H, W, C) the operator repeats K times:
pick the most active position not yet represented, group the positions
cosine-similar to it into an attention map, and suppress them. The K refined
representative vectors are the map-weighted sums of the features, computed in
one matmul once all maps are known. ``docs/operator.md`` is the user's guide.

Domain. The operator is defined for finite, non-negative features (the
post-ReLU output of a CNN stage), channels last. There the similarities lie
in [0, 1], every map is non-negative and sums to 1 (or is all zero, when the
selected position's features are zero), and suppression only lowers scores.
Outside it:
- negative values: the same formulas; a similarity may be negative, so a map
  may hold negative weights and, when its similarities nearly cancel, large
  ones (it still sums to 1 unless the sum is exactly 0, when it is zero);
- a NaN or Inf at some positions: those positions are never selected and
  weigh 0 in every map (the maps stay finite), their norms stay non-finite
  (``~jnp.isfinite(out.norms)`` flags them) and that image's vectors are all
  NaN, so a loss or a prediction built on them cannot look valid. Other images
  of the batch are unaffected. The gradient of such an image is not defined;
- ``checks=True`` reports either case through ``jax.experimental.checkify``.
Channels-first input cannot be told from channels-last by its shape, so it is
not detected: transpose it first (``jnp.moveaxis(x, 1, -1)``).

Memory traffic: one pass over the features for the norms, one matrix-vector
product per round, and one (K, N) x (N, C) matmul at the end, so K + 2 reads
of the features in all and O(N * C) memory; no (N, N) similarity matrix.

Autodiff: a custom JVP rule (``_brnpa_flat_jvp``) gives the derivative of
every output with the selection held fixed (the argmax and the suppression
pass no gradient, as in the paper). Forward mode (``jax.jvp``, ``jacfwd``)
evaluates it; reverse mode (``jax.grad``, ``vjp``, ``jacrev``) transposes it.
The tangent map is written so that its transpose is the cheap gradient:
every feature-sized term is a per-row or per-column product, which transposes
to one elementwise pass, so the gradient reads the features three times after
the forward and writes the result once. Higher orders (``jax.hessian``) work
because the rule itself is plain JAX.

The core works on one example (``brnpa_single``) and is batched with
``jax.vmap`` (``brnpa``).
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# Added to every norm, as in the reference release: keeps the cosine finite
# for all-zero feature vectors.
NORM_EPS = 1e-5

# 'norm': the paper. 'random': the random-vectors ablation as the authors'
# release runs it: each round selects the argmax of a fresh uniform draw,
# without suppression, so a position may be selected again.
_INITS = ("norm", "random")

_HI = jax.lax.Precision.HIGHEST

_TRACED = ("{name} is a traced value here, but it fixes the operator's output "
           "shapes and must be a Python value at trace time: mark it static, "
           "e.g. jax.jit(f, static_argnames=('{name}',)), or bind it with "
           "functools.partial(f, {name}=...).")


class BRNPAOutput(NamedTuple):
  """What the operator returns, ranked in selection order (rank 1 first).

  Attributes:
    vectors: (..., K, C) representative vectors, in the input dtype.
    maps: (..., K, H, W) attention maps in float32 (float64 for float64
      input); on non-negative input each is non-negative and sums to 1, or is
      all zero when the selected position's features are all zero.
    norms: (..., H, W) active level ``||f|| + 1e-5`` of each position, in the
      maps' dtype; non-finite exactly where the features are.
    indices: (..., K) int32 flat index ``h * W + w`` of each selected position.
  """

  vectors: jax.Array
  maps: jax.Array
  norms: jax.Array
  indices: jax.Array


def _safe_norm(x_NxC: jax.Array) -> jax.Array:
  """L2 norm over the last axis whose gradient is 0 (not NaN) at the origin.

  A NaN anywhere in a row gives a NaN norm (``!=``, not ``>``), which is what
  marks the position as non-finite.
  """
  sq = jnp.sum(jnp.square(x_NxC), axis=-1)
  nonzero = sq != 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _normalise(s_xN: jax.Array) -> jax.Array:
  """``s / sum(s)`` over the last axis, zeros where the sum is exactly zero."""
  total = jnp.sum(s_xN, axis=-1, keepdims=True)
  safe = jnp.where(total == 0, 1.0, total)
  return jnp.where(total == 0, 0.0, s_xN / safe)


# -- arguments -------------------------------------------------------------------
def _static_num_maps(num_maps) -> int:
  if isinstance(num_maps, (bool, np.bool_)):
    raise TypeError(f"num_maps must be an int, got the bool {num_maps!r}.")
  try:
    k = operator.index(num_maps)  # int, numpy integers, 0-d integer arrays
  except jax.errors.TracerIntegerConversionError:
    raise TypeError(_TRACED.format(name="num_maps")) from None
  except TypeError:
    raise TypeError(f"num_maps must be an int, got {num_maps!r} "
                    f"({type(num_maps).__name__}).") from None
  if k < 1:
    raise ValueError(f"num_maps must be a positive int, got {k}.")
  return k


def _static_bool(name: str, value) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
      and value.dtype == np.bool_):
    try:
      return bool(value)
    except jax.errors.TracerBoolConversionError:
      raise TypeError(_TRACED.format(name=name)) from None
  raise TypeError(f"{name} must be a bool, got {value!r} "
                  f"({type(value).__name__}).")


def _check_args(feats, spatial_ndim: int, num_maps, init, rng, refine, fn: str
                ) -> tuple[int, bool]:
  """Validates everything known at trace time; returns (K, refine)."""
  k = _static_num_maps(num_maps)
  refine = _static_bool("refine", refine)
  if init not in _INITS:
    raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
  if init == "random" and rng is None:
    raise ValueError("init='random' draws the selection scores at random: "
                     "pass rng=jax.random.key(...).")
  want = "(H, W, C)" if spatial_ndim == 3 else "(B, H, W, C)"
  if feats.ndim != spatial_ndim:
    hint = "; use brnpa() for a batch" if spatial_ndim == 3 else ""
    raise ValueError(f"{fn} expects {want} channels-last features, got shape "
                     f"{feats.shape}{hint}.")
  if not jnp.issubdtype(feats.dtype, jnp.floating):
    raise TypeError(f"features must be floating point, got {feats.dtype}.")
  h, w = feats.shape[-3:-1]
  if k > h * w:
    raise ValueError(f"num_maps={k} is larger than the {h}x{w}={h * w} "
                     "positions of the feature map, which has no more parts "
                     f"to rank: use num_maps <= {h * w} (or a larger map).")
  return k, refine


def _check_domain(feats: jax.Array) -> None:
  """``checks=True``: finite, non-negative features (checkify checks)."""
  bad = ~jnp.isfinite(feats)
  checkify.check(~jnp.any(bad), "brnpa: {n} feature values are NaN or Inf: "
                 "their positions are left out of the maps and the image's "
                 "vectors are NaN.", n=jnp.sum(bad))
  neg = feats < 0
  checkify.check(~jnp.any(neg), "brnpa: {n} feature values are negative "
                 "(smallest {m}): the maps are non-negative and sum to 1 only "
                 "for non-negative (e.g. post-ReLU) features.",
                 n=jnp.sum(neg), m=jnp.min(jnp.where(neg, feats, 0)))


# -- the operator on one example's flattened features --------------------------------
def _forward(x_NxC, scores_KxN, num_maps: int, refine: bool):
  """Outputs and the values the tangent map needs.

  ``scores_KxN`` holds each round's uniform scores for ``init='random'``, or
  is None to select by the suppressed norm.
  """
  ct = jnp.promote_types(x_NxC.dtype, jnp.float32)
  xc_NxC = x_NxC.astype(ct)
  r_N = _safe_norm(xc_NxC)
  n_N = r_N + NORM_EPS
  ok_N = jnp.isfinite(n_N)  # False where any channel is NaN or Inf

  def round_fn(score_N, u_N):
    # On finite features the scores are >= 0, so -inf only excludes.
    j = jnp.argmax(jnp.where(ok_N, score_N if u_N is None else u_N, -jnp.inf))
    s_N = jnp.dot(xc_NxC, xc_NxC[j], precision=_HI) / (n_N * n_N[j])
    s_N = jnp.where(ok_N, s_N, 0.0)
    return score_N * (1.0 - s_N), (j, s_N)  # the release's suppression order

  _, (idx_K, s_KxN) = jax.lax.scan(round_fn, n_N, scores_KxN, length=num_maps)
  total_K = jnp.sum(s_KxN, axis=1)
  maps_KxN = _normalise(s_KxN)

  if not refine:
    vectors = x_NxC[idx_K]
  elif x_NxC.dtype == ct:
    # One matmul for all K refined vectors: the (K+2)-th and last feature read.
    vectors = jnp.dot(maps_KxN, xc_NxC, precision=_HI)
  else:
    vectors = jnp.dot(maps_KxN.astype(x_NxC.dtype), x_NxC,
                      preferred_element_type=ct)
  vectors = jnp.where(jnp.all(ok_N), vectors, jnp.nan).astype(x_NxC.dtype)
  out = (vectors, maps_KxN, n_N, idx_K.astype(jnp.int32))
  return out, (xc_NxC, r_N, n_N, ok_N, s_KxN, total_K, maps_KxN, idx_K)


def _tangent(res, dx_NxC, refine: bool, vec_dtype):
  """The operator's derivative along ``dx`` with the selection fixed.

  Linear in ``dx``. Each feature-sized product with ``dx`` is written per
  row (a sum over channels against a known vector) or per column (a sum over
  positions with known weights), never as a matmul: its transpose, which
  reverse mode runs, is then a per-row outer product that XLA fuses into the
  one pass that writes the gradient. The other reads of the features in the
  gradient: ``G X^T`` (what the vectors pass back to the maps) and ``dS X``
  (the selected rows' share of each similarity). The tangent of a non-finite
  image is not meaningful (its vectors are NaN).
  """
  xc_NxC, r_N, n_N, ok_N, s_KxN, total_K, maps_KxN, idx_K = res
  num_maps = idx_K.shape[0]
  dx_NxC = dx_NxC.astype(xc_NxC.dtype)
  xj_KxC = xc_NxC[idx_K]
  nj_K = n_N[idx_K]

  # n = ||x|| + eps; the safe norm passes no gradient at the origin.
  nz_N = r_N > 0
  inv_r_N = jnp.where(nz_N, 1.0 / jnp.where(nz_N, r_N, 1.0), 0.0)
  dn_N = jnp.sum(xc_NxC * dx_NxC, axis=-1) * inv_r_N
  # s_ki = <x_i, x_j> / (n_i n_j), j = j_k: both factors and both norms move.
  dxj_KxC = dx_NxC[idx_K]
  ddot_KxN = jnp.stack([jnp.sum(dx_NxC * xj_KxC[k], axis=-1)
                        for k in range(num_maps)])
  ddot_KxN = ddot_KxN + jnp.einsum("kc,nc->kn", dxj_KxC, xc_NxC, precision=_HI)
  ds_KxN = (ddot_KxN / (n_N[None, :] * nj_K[:, None])
            - s_KxN * (dn_N[None, :] / n_N[None, :] + (dn_N[idx_K] / nj_K)[:, None]))
  ds_KxN = jnp.where(ok_N[None, :], ds_KxN, 0.0)
  # a = s / sum(s); the guard of _normalise passes no gradient at sum 0.
  ok_K = total_K != 0
  da_KxN = ds_KxN - maps_KxN * jnp.sum(ds_KxN, axis=1, keepdims=True)
  da_KxN = jnp.where(ok_K[:, None],
                     da_KxN / jnp.where(ok_K, total_K, 1.0)[:, None], 0.0)

  if refine:  # v_k = sum_i a_ki x_i
    # A broadcast-reduce, X first: its transpose, G X^T, is then one
    # streaming pass that multiplies X by the broadcast cotangent. As a
    # (K, C) x (C, N) dot XLA:CPU packs X first, and with the operands the
    # other way round it streams; both run ~1.8x slower.
    dv_KxC = jnp.sum(xc_NxC[None] * da_KxN[:, :, None], axis=1)
    dv_KxC = dv_KxC + jnp.stack([jnp.sum(maps_KxN[k][:, None] * dx_NxC, axis=0)
                                 for k in range(num_maps)])
  else:  # v_k = x_jk
    dv_KxC = dxj_KxC
  return dv_KxC.astype(vec_dtype), da_KxN, dn_N


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _brnpa_flat(x_NxC, scores_KxN, num_maps, refine):
  """(vectors, maps_KxN, norms_N, indices_K) of (N, C) features."""
  return _forward(x_NxC, scores_KxN, num_maps, refine)[0]


@_brnpa_flat.defjvp
def _brnpa_flat_jvp(num_maps, refine, primals, tangents):
  x_NxC, scores_KxN = primals
  out, res = _forward(x_NxC, scores_KxN, num_maps, refine)
  dv, da, dn = _tangent(res, tangents[0], refine, out[0].dtype)
  d_idx = np.zeros(out[3].shape, jax.dtypes.float0)
  return out, (dv, da, dn, d_idx)


# -- public ------------------------------------------------------------------------
def brnpa_single(feats_HxWxC: jax.Array, num_maps: int, *, refine: bool = True,
                 init: str = "norm", rng: jax.Array | None = None,
                 checks: bool = False) -> BRNPAOutput:
  """BR-NPA on one feature map.

  Args:
    feats_HxWxC: feature map of one image, channels last, any float dtype;
      finite and non-negative (normally a CNN stage's post-ReLU output; see
      the module docstring for what happens outside that domain).
      Similarities and maps are computed in float32 (float64 for float64).
    num_maps: K (static: a Python or numpy int), at most H * W.
    refine: if True the k-th vector is the map-weighted mean of the features;
      if False it is the selected feature vector itself (ablation). Static.
    init: 'norm' selects by suppressed feature norm (the paper); 'random'
      selects each round the argmax of a fresh uniform draw, without
      suppression (the release's random-vectors ablation; needs ``rng``).
    rng: PRNG key, only used by ``init='random'``.
    checks: add ``jax.experimental.checkify`` checks that the features are
      finite and non-negative. Eagerly a failed check raises at once; under
      ``jax.jit`` the function must be functionalised:
      ``err, out = jax.jit(checkify.checkify(f))(x); err.throw()``.

  Returns:
    A ``BRNPAOutput`` without a leading batch axis.
  """
  num_maps, refine = _check_args(feats_HxWxC, 3, num_maps, init, rng, refine,
                                 "brnpa_single")
  if checks:
    _check_domain(feats_HxWxC)
  h, w, c = feats_HxWxC.shape
  scores_KxN = None
  if init == "random":
    scores_KxN = jax.random.uniform(rng, (num_maps, h * w))
  vectors, maps_KxN, n_N, idx_K = _brnpa_flat(
      feats_HxWxC.reshape(h * w, c), scores_KxN, num_maps, refine)
  return BRNPAOutput(vectors=vectors, maps=maps_KxN.reshape(num_maps, h, w),
                     norms=n_N.reshape(h, w), indices=idx_K)


def brnpa(feats_BxHxWxC: jax.Array, num_maps: int, *, refine: bool = True,
          init: str = "norm", rng: jax.Array | None = None,
          checks: bool = False) -> BRNPAOutput:
  """BR-NPA on a batch of feature maps (``brnpa_single`` under ``jax.vmap``).

  Jit-compatible with ``num_maps``, ``refine`` and ``init`` static
  (``jax.jit(brnpa, static_argnames=('num_maps', 'refine', 'init'))``);
  differentiable in forward and reverse mode, to any order, except through
  the (argmax) selection.

  Args:
    feats_BxHxWxC: (B, H, W, C) feature maps, channels last; finite and
      non-negative (see ``brnpa_single``).
    num_maps: K, the number of ranked maps (static), at most H * W.
    refine: refine the representative vectors (False: 'no refine' ablation).
    init: 'norm' (the paper) or 'random' (ablation, needs ``rng``).
    rng: PRNG key for ``init='random'``; split across the batch.
    checks: checkify checks of the domain (see ``brnpa_single``).

  Returns:
    ``BRNPAOutput`` with vectors (B, K, C), maps (B, K, H, W), norms (B, H, W)
    and indices (B, K).
  """
  num_maps, refine = _check_args(feats_BxHxWxC, 4, num_maps, init, rng, refine,
                                 "brnpa")
  if checks:
    _check_domain(feats_BxHxWxC)
  if init == "random":
    keys = jax.random.split(rng, feats_BxHxWxC.shape[0])
    fn = lambda f, k: brnpa_single(f, num_maps, refine=refine, init=init, rng=k)
    return jax.vmap(fn)(feats_BxHxWxC, keys)
  fn = lambda f: brnpa_single(f, num_maps, refine=refine, init=init)
  return jax.vmap(fn)(feats_BxHxWxC)
