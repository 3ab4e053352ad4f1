"""Localisation of saliency maps against ground-truth masks, as Quantus 0.6.0
defines it (docs/explanations.md).

- ``relevance_rank_accuracy`` (Arras et al. 2022): with K the mask's pixel
  count, the share of the K most relevant pixels that lie in the mask.
- ``relevance_mass_accuracy`` (Arras et al. 2022): the share of the map's
  sum that lies in the mask. It is the energy pointing game
  (``metrics.energy_pointing_game``) without its ReLU: for a non-negative map
  the two are the same number, since both are ratios and the energy pointing
  game's max-normalisation cancels.
- ``top_k_intersection`` (Theiner et al. 2021): the share of the k most
  relevant pixels that lie in the mask (k = 1000 by default), optionally
  times n / K (``concept_influence``).

Maps and masks are (B, H, W) at the same resolution (``at_mask_resolution``
upsamples a map bilinearly, as the pointing games do). An image whose mask is
empty gives NaN (Quantus's choice), which the summaries leave out. The top
pixels are those a stable sort would put first (ties in index order), found
without a sort (``top_mask``); Quantus uses numpy's default sort, whose order
among tied values is unspecified, so maps with plateaus (zeros of a ReLU) can
differ there by the tied pixels at the K-th rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from brnpa_jax.explain import metrics

TOP_K = 1000  # Quantus's default k


def at_mask_resolution(maps_Bxhxw, masks_BxHxW) -> tuple[jax.Array, jax.Array]:
  """(maps upsampled to the masks' size, masks as bool)."""
  masks = jnp.asarray(masks_BxHxW)
  if masks.ndim != 3:
    raise ValueError(f"masks must be (B, H, W); got shape {masks.shape}.")
  maps = jnp.asarray(maps_Bxhxw, jnp.float32)
  if maps.shape[1:] != masks.shape[1:]:
    maps = metrics.upsample(maps, masks.shape[1:])
  return maps, masks > 0.5


def _order_keys(a_BxN) -> jax.Array:
  """uint32 keys in the order of the float32 values."""
  bits = jax.lax.bitcast_convert_type(a_BxN.astype(jnp.float32), jnp.uint32)
  negative = bits >= jnp.uint32(0x80000000)
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_mask(a_BxN, k_B) -> jax.Array:
  """(B, N) bool: the k largest values of each row, ties in index order (as
  a stable sort would take them).

  Found without sorting (XLA's sort is slow on CPUs): the k-th largest
  value by bisection over the 32 bits of its order key, then the tied
  values at that threshold in index order.
  """
  keys = _order_keys(a_BxN)
  k = jnp.asarray(k_B, jnp.int32)[:, None]

  def step(_, bounds):  # the largest t with count(keys >= t) >= k
    lo, hi = bounds
    mid = lo + (hi - lo + 1) // 2
    ok = jnp.sum(keys >= mid, axis=1, keepdims=True) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo = jnp.min(keys, axis=1, keepdims=True)
  hi = jnp.max(keys, axis=1, keepdims=True)
  t, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  above = keys > t
  tied = keys == t
  room = k - jnp.sum(above, axis=1, keepdims=True)
  return above | (tied & (jnp.cumsum(tied, axis=1) <= room))


def _flat(maps, masks):
  b = maps.shape[0]
  return maps.reshape(b, -1), masks.reshape(b, -1)


@jax.jit
def relevance_rank_accuracy(maps_BxHxW, masks_BxHxW) -> jax.Array:
  """Share of the K = |mask| top-ranked pixels inside the mask; (B,)."""
  a, s = _flat(*at_mask_resolution(maps_BxHxW, masks_BxHxW))
  k = jnp.sum(s, axis=1)
  hits = jnp.sum(s & top_mask(a, k), axis=1)
  return jnp.where(k > 0, hits / jnp.maximum(k, 1), jnp.nan)


@jax.jit
def relevance_mass_accuracy(maps_BxHxW, masks_BxHxW) -> jax.Array:
  """``sum(a * mask) / sum(a)`` per image; (B,)."""
  a, s = _flat(*at_mask_resolution(maps_BxHxW, masks_BxHxW))
  mass = jnp.sum(a * s, axis=1) / jnp.sum(a, axis=1)
  return jnp.where(jnp.any(s, axis=1), mass, jnp.nan)


@functools.partial(jax.jit, static_argnames=("k", "concept_influence"))
def top_k_intersection(maps_BxHxW, masks_BxHxW, k: int = TOP_K,
                       concept_influence: bool = False) -> jax.Array:
  """Share of the k top-ranked pixels inside the mask; (B,).

  Args:
    maps_BxHxW: saliency (upsampled to the masks' size if smaller).
    masks_BxHxW: ground-truth masks ({0, 1}).
    k: pixels; at most H * W.
    concept_influence: multiply by n / |mask| (Quantus's option).
  """
  a, s = _flat(*at_mask_resolution(maps_BxHxW, masks_BxHxW))
  n = a.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, {n}] (pixels of the mask); got {k}.")
  tki = jnp.sum(s & top_mask(a, jnp.full(a.shape[:1], k)), axis=1) / k
  size = jnp.sum(s, axis=1)
  if concept_influence:
    tki = tki * n / jnp.maximum(size, 1)
  return jnp.where(size > 0, tki, jnp.nan)
