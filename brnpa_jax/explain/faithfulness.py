"""Quantus's faithfulness metrics, batched and jitted (docs/explanations.md).

Beside the deletion and insertion curves of ``metrics.py``:

- ``faithfulness_correlation`` (Bhatt et al. 2020): over R random subsets
  of S features, the Pearson correlation between the map's sum over the
  subset and the drop of the class logit when the subset is set to the
  image's minimum ("black").
- ``pixel_flipping`` (Bach et al. 2015): features set to the image's minimum
  in the order of the map, ``features_in_step`` at a time; the curve is the
  class probability after each step.
- ``region_perturbation`` (Samek et al. 2016): non-overlapping
  ``patch_size`` patches ordered by their summed relevance (MoRF, LeRF or
  random), set to the minimum one after another; the curve is the drop of
  the class probability.
- ``road`` (Rong et al. 2022): the p % most (MoRF) or least (LeRF) relevant
  pixels replaced by noisy linear imputation (``imputation.py``); the curve
  is whether the prediction stays the class, per percentage.

A *feature*, as in Quantus, is one channel of one pixel, numbered
channel-first: ``f = c * H * W + y * W + x`` (the map is repeated over the
channels). Every perturbed image of many (image, step) pairs is built on the
device and the pairs go through the model in fixed-size chunks, one jitted
function per shape (as ``metrics.PerturbationCurves``). Random draws (the
subsets, ROAD's noise) come from a key, or are passed in explicitly, which
the golden tests against Quantus do.

Orders are stable sorts (ties in feature order); Quantus uses numpy's
default sort, whose order among tied values is unspecified: with maps
without ties, and for pixel flipping with whole pixels per step, the values
are the same (tests/test_quantus_golden.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax.explain import imputation, metrics

ApplyFn = Callable[[Any, jax.Array], jax.Array]

ROAD_PERCENTAGES = tuple(range(1, 100, 2))  # Quantus's default
ROAD_NOISE = 0.01
FC_RUNS, FC_SUBSET = 100, 224  # Quantus's faithfulness correlation defaults
PATCH_SIZE, REGIONS = 8, 100  # Quantus's region perturbation defaults
ORDERS = ("morf", "lerf", "random")


def feature_ranks(maps_BxHxW, channels: int, order: str = "morf") -> jax.Array:
  """(B, H, W, C) int32: each feature's place in the order (0 first)."""
  a = jnp.asarray(maps_BxHxW, jnp.float32)
  b, h, w = a.shape
  flat = jnp.broadcast_to(a[:, None], (b, channels, h, w)).reshape(b, -1)
  rank = metrics.descending_rank(flat if order == "morf" else -flat)
  return rank.reshape(b, channels, h, w).transpose(0, 2, 3, 1)


def _class_scores(apply_fn, variables, images, classes, softmax: bool):
  logits = apply_fn(variables, images).astype(jnp.float32)
  scores = jax.nn.softmax(logits, -1) if softmax else logits
  return jnp.take_along_axis(scores, classes[:, None], 1)[:, 0]


def _pairs(num_images: int, num_steps: int, chunk: int,
           step_major: bool = False):
  """Image and step index of every pair (image by image, or step by step),
  padded to a chunk multiple."""
  total = num_images * num_steps
  padded = -(-total // chunk) * chunk
  image = np.repeat(np.arange(num_images, dtype=np.int32), num_steps)
  step = np.tile(np.arange(num_steps, dtype=np.int32), num_images)
  if step_major:
    image, step = (np.tile(np.arange(num_images, dtype=np.int32), num_steps),
                   np.repeat(np.arange(num_steps, dtype=np.int32), num_images))
  pad = padded - total
  return (np.concatenate([image, np.zeros(pad, np.int32)]),
          np.concatenate([step, np.zeros(pad, np.int32)]), total)


class Faithfulness:
  """Quantus's faithfulness metrics for one model function.

  Attributes:
    apply_fn: ``apply_fn(variables, images) -> logits`` (pure, jittable).
    chunk_size: perturbed images per forward; bounds memory.
  """

  def __init__(self, apply_fn: ApplyFn, chunk_size: int = 64):
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    self.apply_fn, self.chunk_size = apply_fn, chunk_size
    self._scores = jax.jit(functools.partial(_class_scores, apply_fn),
                           static_argnames="softmax")
    self._threshold = jax.jit(self._threshold_chunk, static_argnames="softmax")
    self._subset = jax.jit(self._subset_chunk, static_argnames="subset")
    self._road = jax.jit(self._road_chunk, static_argnames="explicit")

  def _run(self, fn, num_images, step_values, *args, step_major=False, **kw
           ) -> np.ndarray:
    """``fn(*args, pair_image, pair_step, pair_value)`` over every (image,
    step) pair, ``pair_value`` being the step's entry of ``step_values``
    (taken on the host, so the number of steps is no traced shape).
    ``step_major`` groups the pairs of one step in a chunk (ROAD: the
    imputations of one percentage converge together)."""
    num_steps = len(step_values)
    image, step, total = _pairs(num_images, num_steps, self.chunk_size,
                                step_major)
    value = np.asarray(step_values, np.int32)[step]
    c = self.chunk_size
    out = [fn(*args, image[i:i + c], step[i:i + c], value[i:i + c], **kw)
           for i in range(0, len(image), c)]
    out = np.asarray(jnp.concatenate(out))[:total]
    if step_major:
      return out.reshape(num_steps, num_images).T
    return out.reshape(num_images, num_steps)

  # -- perturbations by threshold: pixel flipping, region perturbation -----------
  def _threshold_chunk(self, variables, images, ranks, baseline, classes,
                       pair_image, pair_step, pair_k, *, softmax):
    del pair_step
    take = ranks[pair_image] < pair_k[:, None, None, None]
    x = jnp.where(take, baseline[pair_image][:, None, None, None],
                  images[pair_image])
    return _class_scores(self.apply_fn, variables, x, classes[pair_image],
                         softmax)

  def pixel_flipping(self, variables, images_BxHxWxC, maps_BxHxW, classes_B,
                     *, features_in_step: int = 1) -> np.ndarray:
    """Class probability after each step of ``features_in_step`` features.

    Args:
      variables: model variables.
      images_BxHxWxC: model inputs.
      maps_BxHxW: saliency at the input resolution.
      classes_B: the class tracked.
      features_in_step: features (channel values) per step (Quantus's
        default 1; a multiple of C takes whole pixels).

    Returns:
      (B, ceil(H*W*C / features_in_step)) float32 numpy curves.
    """
    images = jnp.asarray(images_BxHxWxC, jnp.float32)
    b, h, w, c = images.shape
    n = h * w * c
    if not 1 <= features_in_step <= n:
      raise ValueError(f"features_in_step must be in [1, {n}]; got "
                       f"{features_in_step}.")
    steps = -(-n // features_in_step)
    thresholds = np.minimum(np.arange(1, steps + 1) * features_in_step, n)
    ranks = feature_ranks(maps_BxHxW, c)
    baseline = jnp.min(images, axis=(1, 2, 3))
    return self._run(self._threshold, b, thresholds, variables, images, ranks,
                     baseline, jnp.asarray(classes_B, jnp.int32), softmax=True)

  def region_perturbation(self, variables, images_BxHxWxC, maps_BxHxW,
                          classes_B, *, patch_size: int = PATCH_SIZE,
                          regions: int = REGIONS, order: str = "morf",
                          rng=None) -> np.ndarray:
    """Drop of the class probability as patches are set to the minimum.

    Patches tile the image padded to a multiple of ``patch_size`` (Quantus's
    padding: the remainder split floor/ceil); a patch's relevance is the
    map's sum over it.

    Args:
      variables: model variables.
      images_BxHxWxC: model inputs.
      maps_BxHxW: saliency at the input resolution.
      classes_B: the class tracked.
      patch_size: side of a patch in pixels.
      regions: patches perturbed at most (the curve's length, capped by the
        number of patches).
      order: 'morf', 'lerf' or 'random' (then ``rng`` draws the order).
      rng: key for ``order='random'``.

    Returns:
      (B, min(regions, patches)) float32 numpy curves.
    """
    if order not in ORDERS:
      raise ValueError(f"order must be one of {ORDERS}; got {order!r}.")
    images = jnp.asarray(images_BxHxWxC, jnp.float32)
    b, h, w, c = images.shape
    pads = [((patch_size - d % patch_size) % patch_size) // 2 for d in (h, w)]
    nh, nw = -(-h // patch_size), -(-w // patch_size)
    py = (np.arange(h) + pads[0]) // patch_size
    px = (np.arange(w) + pads[1]) // patch_size
    patch_of = jnp.asarray(py[:, None] * nw + px[None, :], jnp.int32)
    a = jnp.asarray(maps_BxHxW, jnp.float32)
    sums = jax.ops.segment_sum(a.reshape(b, -1).T, patch_of.reshape(-1),
                               nh * nw).T
    if order == "random":
      keys = jax.random.split(rng if rng is not None else jax.random.key(0), b)
      patch_rank = jax.vmap(lambda k: jax.random.permutation(k, nh * nw))(keys)
      patch_rank = jnp.argsort(patch_rank, axis=1).astype(jnp.int32)
    else:
      patch_rank = metrics.descending_rank(sums if order == "morf" else -sums)
    ranks = jnp.take_along_axis(patch_rank, jnp.broadcast_to(
        patch_of.reshape(1, -1), (b, h * w)), 1).reshape(b, h, w)
    ranks = jnp.broadcast_to(ranks[..., None], (b, h, w, c))
    steps = min(regions, nh * nw)
    thresholds = np.arange(1, steps + 1)
    baseline = jnp.min(images, axis=(1, 2, 3))
    classes = jnp.asarray(classes_B, jnp.int32)
    y = self._scores(variables, images, classes, softmax=True)
    curves = self._run(self._threshold, b, thresholds, variables, images,
                       ranks, baseline, classes, softmax=True)
    return np.asarray(y)[:, None] - curves

  # -- faithfulness correlation ------------------------------------------------------
  def _subset_chunk(self, variables, images, flat_maps, baseline, classes,
                    subsets, key, pair_image, pair_run, pair_value, *, subset):
    del pair_value
    b, h, w, c = images.shape
    n = h * w * c
    if subsets is None:  # S of n features without replacement, per pair
      pair_keys = jax.vmap(lambda i, r: jax.random.fold_in(
          jax.random.fold_in(key, i), r))(pair_image, pair_run)
      idx = jax.vmap(lambda k: jax.lax.top_k(
          jax.random.uniform(k, (n,)), subset)[1])(pair_keys)
    else:
      idx = subsets[pair_image, pair_run]
    chosen = jnp.zeros((len(pair_image), n), bool).at[
        jnp.arange(len(pair_image))[:, None], idx].set(True)
    chosen = chosen.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
    x = jnp.where(chosen, baseline[pair_image][:, None, None, None],
                  images[pair_image])
    scores = _class_scores(self.apply_fn, variables, x, classes[pair_image],
                           False)
    sums = jnp.sum(jnp.take_along_axis(flat_maps[pair_image], idx, 1), 1)
    return jnp.stack([scores, sums], -1)

  def faithfulness_correlation(self, variables, images_BxHxWxC, maps_BxHxW,
                               classes_B, *, runs: int = FC_RUNS,
                               subset: int = FC_SUBSET, rng=None,
                               subsets_BxRxS=None) -> np.ndarray:
    """Pearson correlation, over ``runs`` random feature subsets, of the
    map's sum over the subset and the drop of the class logit; (B,).

    Args:
      variables: model variables.
      images_BxHxWxC: model inputs.
      maps_BxHxW: saliency at the input resolution.
      classes_B: the class tracked.
      runs: subsets per image (R).
      subset: features per subset (S).
      rng: key of the subsets (default ``jax.random.key(0)``).
      subsets_BxRxS: explicit feature indices (channel-first numbering);
        overrides ``runs``, ``subset`` and ``rng``.
    """
    images = jnp.asarray(images_BxHxWxC, jnp.float32)
    b, h, w, c = images.shape
    if subsets_BxRxS is not None:
      subsets_BxRxS = jnp.asarray(subsets_BxRxS, jnp.int32)
      runs, subset = subsets_BxRxS.shape[1:]
    if not 1 <= subset <= h * w * c:
      raise ValueError(f"subset must be in [1, {h * w * c}]; got {subset}.")
    a = jnp.asarray(maps_BxHxW, jnp.float32)
    flat = jnp.broadcast_to(a[:, None], (b, c, h, w)).reshape(b, -1)
    classes = jnp.asarray(classes_B, jnp.int32)
    key = rng if rng is not None else jax.random.key(0)
    out = self._run_pairs_stacked(
        self._subset, b, runs, variables, images, flat,
        jnp.min(images, axis=(1, 2, 3)), classes, subsets_BxRxS, key,
        subset=subset)
    y = np.asarray(self._scores(variables, images, classes, softmax=False))
    return pearson(y[:, None] - out[..., 0], out[..., 1])

  def _run_pairs_stacked(self, fn, num_images, num_steps, *args, **kw):
    image, step, total = _pairs(num_images, num_steps, self.chunk_size)
    c = self.chunk_size
    out = [fn(*args, image[i:i + c], step[i:i + c], step[i:i + c], **kw)
           for i in range(0, len(image), c)]
    out = np.asarray(jnp.concatenate(out))[:total]
    return out.reshape(num_images, num_steps, *out.shape[1:])

  # -- ROAD ------------------------------------------------------------------------
  def _road_chunk(self, variables, images, pixel_ranks, classes, noise, sigma,
                  key, pair_image, pair_step, pair_k, *, explicit):
    removed = pixel_ranks[pair_image] < pair_k[:, None, None]
    x = images[pair_image]
    if explicit:
      z = noise[pair_image, pair_step]
    else:
      keys = jax.vmap(lambda i, p: jax.random.fold_in(
          jax.random.fold_in(key, i), p))(pair_image, pair_step)
      z = sigma * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
    x = imputation.impute(x, removed, z)
    logits = self.apply_fn(variables, x)
    return (jnp.argmax(logits, -1) == classes[pair_image]).astype(jnp.float32)

  def road(self, variables, images_BxHxWxC, maps_BxHxW, classes_B, *,
           percentages=ROAD_PERCENTAGES, order: str = "morf",
           noise: float = ROAD_NOISE, rng=None, noise_BxPxHxWxC=None
           ) -> np.ndarray:
    """Whether the class is still predicted after ROAD's imputation of the
    p % most (``morf``) or least (``lerf``) relevant pixels, per percentage.

    The k = int(H * W * p / 100) pixels first in the order are removed
    (all channels; Quantus 0.6.0 counts the same k but ranks the features
    of all channels together, see docs/explanations.md).

    Args:
      variables: model variables.
      images_BxHxWxC: model inputs.
      maps_BxHxW: saliency at the input resolution.
      classes_B: the class tracked (Quantus: the label given).
      percentages: the P percentages.
      order: 'morf' or 'lerf'.
      noise: standard deviation of the noise added to imputed pixels.
      rng: key of the noise (default ``jax.random.key(0)``).
      noise_BxPxHxWxC: explicit noise, already scaled (overrides ``noise``
        and ``rng``).

    Returns:
      (B, P) float32 numpy array of 0/1.
    """
    if order not in ("morf", "lerf"):
      raise ValueError(f"ROAD's order must be 'morf' or 'lerf'; got {order!r}.")
    images = jnp.asarray(images_BxHxWxC, jnp.float32)
    b, h, w, _ = images.shape
    a = jnp.asarray(maps_BxHxW, jnp.float32).reshape(b, -1)
    ranks = metrics.descending_rank(a if order == "morf" else -a)
    counts = [int(h * w * p / 100) for p in percentages]
    explicit = noise_BxPxHxWxC is not None
    z = jnp.asarray(noise_BxPxHxWxC, jnp.float32) if explicit else None
    key = rng if rng is not None else jax.random.key(0)
    return self._run(self._road, b, counts, variables, images,
                     ranks.reshape(b, h, w),
                     jnp.asarray(classes_B, jnp.int32), z, noise, key,
                     explicit=explicit, step_major=True)


def pearson(a_BxR, b_BxR) -> np.ndarray:
  """Pearson correlation of each row pair (float64; NaN for a constant row)."""
  a = np.asarray(a_BxR, np.float64)
  b = np.asarray(b_BxR, np.float64)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def curve_area(curves_BxS) -> np.ndarray:
  """Mean of each curve (its area with x spread evenly over [0, 1] by the
  midpoint rule): AOPC for region perturbation, the ROAD score."""
  return np.asarray(curves_BxS, np.float64).mean(1)
