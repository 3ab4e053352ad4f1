"""Faithfulness and localisation metrics of saliency maps (docs/method.md#metrics).

- ``sparsity``: the release definition (lower = sparser).
- ``PerturbationCurves``: deletion and insertion curves and their AUCs, in
  the release protocol (cell blocks at feature-map resolution) and the
  standard RISE protocol (pixels at input resolution). Every perturbed image
  is built on the device from a rank map and a threshold (step ``s`` of a
  deletion replaces the pixels whose rank is below ``k_s``), and the
  perturbed images of many (image, step) pairs go through the model together
  in fixed-size chunks: one jitted function per image shape and chunk size,
  never one forward per step.
- ``pointing_game`` (15-pixel tolerance) and ``energy_pointing_game`` against
  ground-truth masks; ``box_to_mask`` turns boxes into masks.

Saliency maps are (B, h, w) with larger = more important; they are upsampled
to the input resolution where a protocol needs it (bilinear).

The model function may compute in bfloat16 (``evaluate --dtype bfloat16``):
perturbed images are built in float32 and the logits are cast to float32
before the softmax. With the tracked class taken from the float32 forward,
the mean DAUC and IAUC move by less than ``BF16_AUC_TOLERANCE`` against
float32 forwards (the trained default run's 1,000 test images: at most
2e-4, one image at most 0.02; benchmarks/README.md).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax.errors import ConfigError

# apply_fn(variables, images (B, H, W, 3)) -> logits (B, num_classes).
ApplyFn = Callable[[Any, jax.Array], jax.Array]

RELEASE_BLUR = 121  # side of the release protocol's insertion box filter
RISE_BLUR = (11, 5.0)  # RISE's Gaussian kernel: side, sigma
POINTING_TOLERANCE = 15  # pixels
BF16_AUC_TOLERANCE = 0.005  # |mean AUC, bfloat16 forwards - mean AUC, float32|


# -- sparsity ----------------------------------------------------------------
def sparsity(maps_BxKxhxw, norms_Bxhxw=None) -> jax.Array:
  """Release sparsity per image (lower = sparser).

  ``n = norms / max(norms)``; ``A_k <- A_k * n``; ``A_k <- A_k / (max A_k +
  1e-5)``; the mean over the K maps, then over positions. Without norms the
  maps are used as they are (a post-hoc saliency map: pass it as K=1). For
  the ``gap`` head (docs/method.md#sparsity: the normalised norm map itself) pass
  ``norms[:, None]`` as the maps and no norms.

  Args:
    maps_BxKxhxw: non-negative maps.
    norms_Bxhxw: feature-norm maps, or None.

  Returns:
    (B,) float32.
  """
  maps = jnp.asarray(maps_BxKxhxw, jnp.float32)
  if maps.ndim != 4:
    raise ValueError(f"maps must be (B, K, h, w); got shape {maps.shape}. "
                     "Add a K axis of 1 for a single saliency map.")
  if norms_Bxhxw is not None:
    n = jnp.asarray(norms_Bxhxw, jnp.float32)
    peak = jnp.max(n, axis=(1, 2), keepdims=True)
    maps = maps * (n / jnp.where(peak > 0, peak, 1.0))[:, None]
  maps = maps / (jnp.max(maps, axis=(2, 3), keepdims=True) + 1e-5)
  return jnp.mean(maps, axis=(1, 2, 3))


# -- helpers -------------------------------------------------------------------
def minmax(saliency_Bxhxw) -> jax.Array:
  """Each map scaled to [0, 1]; a constant map becomes zeros."""
  s = jnp.asarray(saliency_Bxhxw, jnp.float32)
  lo = jnp.min(s, axis=(1, 2), keepdims=True)
  span = jnp.max(s, axis=(1, 2), keepdims=True) - lo
  return (s - lo) / jnp.where(span > 0, span, 1.0)


def upsample(saliency_Bxhxw, size: tuple[int, int]) -> jax.Array:
  """Bilinear upsampling to ``size`` (H, W) (half-pixel centres)."""
  s = jnp.asarray(saliency_Bxhxw, jnp.float32)
  return jax.image.resize(s, (s.shape[0], *size), "bilinear")


def to_cells(saliency_BxHxW, cells: tuple[int, int]) -> jax.Array:
  """Input-resolution saliency averaged over the pixel block of each feature
  cell (area resampling when the sizes do not divide), for the release
  protocol's cell ranking of post-hoc maps."""
  s = jnp.asarray(saliency_BxHxW, jnp.float32)
  b, hh, ww = s.shape
  h, w = cells
  if (hh, ww) == (h, w):
    return s
  if hh % h == 0 and ww % w == 0:
    return s.reshape(b, h, hh // h, w, ww // w).mean(axis=(2, 4))
  return jax.image.resize(s, (b, h, w), "linear", antialias=True)


def descending_rank(values_BxN) -> jax.Array:
  """0 for the largest value of each row; ties keep index order."""
  order = jnp.argsort(-values_BxN, axis=1, stable=True)
  ranks = jnp.argsort(order, axis=1, stable=True)
  return ranks.astype(jnp.int32)


def _cell_of_pixel(cells: int, pixels: int) -> np.ndarray:
  """Index of the feature cell under each pixel along one axis."""
  return (np.arange(pixels) * cells) // pixels


def box_blur(images_BxHxWx3, size: int = RELEASE_BLUR) -> jax.Array:
  """Mean over a ``size`` x ``size`` window, zero padding (counted as zeros)."""
  if size % 2 != 1:
    raise ValueError(f"box blur size must be odd; got {size}.")
  half = size // 2
  x = jnp.asarray(images_BxHxWx3, jnp.float32)
  pad = ((0, 0), (half, half), (half, half), (0, 0))
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, size, size, 1),
                                 (1, 1, 1, 1), pad)
  return summed / (size * size)


@functools.lru_cache(maxsize=4)
def rise_kernel(side: int = RISE_BLUR[0], sigma: float = RISE_BLUR[1]
                ) -> np.ndarray:
  """RISE's ``gkern``: a centred delta filtered by a Gaussian (scipy, reflect
  boundary), so the (side, side) kernel sums to 1."""
  from scipy.ndimage import gaussian_filter  # scipy comes with jax
  delta = np.zeros((side, side))
  delta[side // 2, side // 2] = 1.0
  return gaussian_filter(delta, sigma).astype(np.float32)


def gaussian_blur(images_BxHxWx3, side: int = RISE_BLUR[0],
                  sigma: float = RISE_BLUR[1]) -> jax.Array:
  """Per-channel convolution with ``rise_kernel``, zero padding (as RISE)."""
  x = jnp.asarray(images_BxHxWx3, jnp.float32)
  c = x.shape[-1]
  kernel = jnp.tile(jnp.asarray(rise_kernel(side, sigma))[:, :, None, None],
                    (1, 1, 1, c))
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c)


def trapezoid_auc(curves_BxS) -> np.ndarray:
  """Trapezoid rule with the S points evenly spread over x in [0, 1]."""
  y = np.asarray(curves_BxS, np.float64)
  if y.shape[1] < 2:
    raise ValueError("a curve needs at least 2 points for an AUC.")
  return (y.sum(1) - 0.5 * (y[:, 0] + y[:, -1])) / (y.shape[1] - 1)


# -- deletion / insertion ------------------------------------------------------
def release_order(saliency_Bxhxw, size: tuple[int, int], steps: int | None
                  ) -> tuple[jax.Array, np.ndarray]:
  """Release protocol: each pixel's processing rank (its cell's rank by
  min-max normalised saliency, ties in index order) and the S thresholds
  ``s * N // S``, s = 1..S (None: S = N, one step per cell).

  Returns:
    ranks (B, H, W) int32 and thresholds (S,).
  """
  sal = minmax(saliency_Bxhxw)
  b, h, w = sal.shape
  n = h * w
  steps = n if steps is None else steps
  if not 1 <= steps <= n:
    raise ConfigError(f"steps must be in [1, {n}] (cells of the {h}x{w} map);"
                      f" got {steps}. The release protocol takes at most one "
                      "step per cell: lower --steps, or leave it out.")
  cell_rank = descending_rank(sal.reshape(b, n)).reshape(b, h, w)
  ranks = cell_rank[:, _cell_of_pixel(h, size[0])][:, :, _cell_of_pixel(w, size[1])]
  return ranks, (np.arange(1, steps + 1) * n) // steps


def standard_order(saliency_Bxhxw, size: tuple[int, int],
                   pixels_per_step: int | None) -> tuple[jax.Array, np.ndarray]:
  """Standard protocol: each pixel's rank by the bilinearly upsampled
  saliency and the thresholds ``0, p, 2p, ..., H*W`` (p = pixels per step,
  None: the image width).

  Returns:
    ranks (B, H, W) int32 and thresholds (S + 1,).
  """
  pixels = size[0] * size[1]
  per_step = size[1] if pixels_per_step is None else pixels_per_step
  if per_step < 1:
    raise ValueError(f"pixels_per_step must be >= 1; got {per_step}.")
  sal = upsample(saliency_Bxhxw, size)
  b = sal.shape[0]
  ranks = descending_rank(sal.reshape(b, pixels)).reshape(b, *size)
  steps = -(-pixels // per_step)
  return ranks, np.minimum(np.arange(steps + 1) * per_step, pixels)


def perturbed_probs(apply_fn, variables, starts, ends, ranks_BxHxW, classes_B,
                 pair_image_C, pair_k_C):
  """Probabilities of the tracked class for C (image, threshold) pairs.

  Pair c shows image ``pair_image_C[c]`` with the pixels of rank below
  ``pair_k_C[c]`` taken from ``ends`` and the others from ``starts``.
  """
  take = ranks_BxHxW[pair_image_C] < pair_k_C[:, None, None]
  images = jnp.where(take[..., None], ends[pair_image_C], starts[pair_image_C])
  logits = apply_fn(variables, images).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.take_along_axis(probs, classes_B[pair_image_C][:, None], 1)[:, 0]


class PerturbationCurves:
  """Deletion and insertion curves through batched, jitted forwards.

  One instance per model function; its jitted chunk function is reused for
  every batch of the same shape.

  Attributes:
    apply_fn: ``apply_fn(variables, images) -> logits`` (pure, jittable).
    chunk_size: perturbed images per forward; bounds memory.
  """

  def __init__(self, apply_fn: ApplyFn, chunk_size: int = 64):
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    self.apply_fn = apply_fn
    self.chunk_size = chunk_size
    self._chunk = jax.jit(functools.partial(perturbed_probs, apply_fn))
    self._predict = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), -1))

  def predicted_classes(self, variables, images_BxHxWx3) -> jax.Array:
    """The class each unperturbed image is predicted as (tracked by curves)."""
    return self._predict(variables, jnp.asarray(images_BxHxWx3, jnp.float32))

  def curves(self, variables, starts, ends, ranks_BxHxW, thresholds_S,
             classes_B, num_valid: int | None = None) -> np.ndarray:
    """Tracked-class probability for every image and threshold.

    Args:
      variables: model variables.
      starts: (B, H, W, 3) images shown where nothing is processed yet.
      ends: (B, H, W, 3) images shown where pixels are processed.
      ranks_BxHxW: int32 processing order of each pixel (0 first).
      thresholds_S: point s shows the pixels of rank < thresholds_S[s] from
        ``ends``.
      classes_B: tracked class per image.
      num_valid: only the first ``num_valid`` images are real (a padded last
        batch keeps its shape, so nothing recompiles); None: all.

    Returns:
      (num_valid, S) float32 numpy array.
    """
    b = ranks_BxHxW.shape[0] if num_valid is None else num_valid
    s = len(thresholds_S)
    pair_image = np.repeat(np.arange(b, dtype=np.int32), s)
    pair_k = np.tile(np.asarray(thresholds_S, np.int32), b)
    total = b * s
    padded = -(-total // self.chunk_size) * self.chunk_size
    # Padding pairs repeat pair 0; their results are dropped.
    pair_image = np.concatenate([pair_image, np.zeros(padded - total, np.int32)])
    pair_k = np.concatenate([pair_k, np.full(padded - total, pair_k[0], np.int32)])
    args = (jnp.asarray(starts, jnp.float32), jnp.asarray(ends, jnp.float32),
            jnp.asarray(ranks_BxHxW, jnp.int32),
            jnp.asarray(classes_B, jnp.int32))
    out = [self._chunk(variables, *args, pair_image[i:i + self.chunk_size],
                       pair_k[i:i + self.chunk_size])
           for i in range(0, padded, self.chunk_size)]
    return np.asarray(jnp.concatenate(out))[:total].reshape(b, s)

  def _run(self, variables, images, ranks, thresholds, substrate, blurred,
           modes, classes, num_valid):
    images = jnp.asarray(images, jnp.float32)
    if classes is None:
      classes = self.predicted_classes(variables, images)
    out = {}
    for mode in modes:
      if mode == "deletion":
        curve = self.curves(variables, images, substrate, ranks, thresholds,
                            classes, num_valid)
      elif mode == "insertion":
        curve = self.curves(variables, blurred, images, ranks, thresholds,
                            classes, num_valid)
      else:
        raise ValueError(f"Unknown mode {mode!r}; use 'deletion' or 'insertion'.")
      out[f"{mode}_curve"] = curve
      out[f"{mode}_auc"] = trapezoid_auc(curve)
    return out

  def release(self, variables, images_BxHxWx3, saliency_Bxhxw, *,
              steps: int | None = None, classes_B=None,
              modes=("deletion", "insertion"), num_valid: int | None = None
              ) -> dict[str, np.ndarray]:
    """The release protocol: cells of the feature map, block by block.

    Step s (1..S) processes the ``s * N // S`` most salient cells (N = h*w
    cells; saliency min-max normalised, ties in index order); deletion sets
    their pixel blocks to 0 (in the normalised space the model sees),
    insertion restores them from the original onto the image blurred by a
    121x121 box filter with zero padding. The curve is the softmax
    probability of the class predicted on the unperturbed image after each
    step; the AUC is the trapezoid rule over the S points spread evenly on
    x in [0, 1].

    Args:
      variables: model variables.
      images_BxHxWx3: normalised model inputs.
      saliency_Bxhxw: saliency at feature-map resolution.
      steps: S; None for one step per cell (the paper also uses 196).
      classes_B: tracked classes; None for the predicted ones.
      modes: which of 'deletion', 'insertion' to compute.
      num_valid: curves of the first ``num_valid`` images only (see
        ``curves``); None: all.

    Returns:
      ``{mode}_curve`` (B, S) and ``{mode}_auc`` (B,) numpy arrays.
    """
    images = jnp.asarray(images_BxHxWx3, jnp.float32)
    ranks, thresholds = release_order(saliency_Bxhxw, images.shape[1:3], steps)
    blurred = box_blur(images) if "insertion" in modes else None
    return self._run(variables, images, ranks, thresholds,
                     jnp.zeros_like(images), blurred, modes, classes_B,
                     num_valid)

  def standard(self, variables, images_BxHxWx3, saliency_Bxhxw, *,
               pixels_per_step: int | None = None, classes_B=None,
               modes=("deletion", "insertion"), num_valid: int | None = None
               ) -> dict[str, np.ndarray]:
    """The standard protocol (Petsiuk et al. 2018, RISE).

    Pixels at input resolution ranked by the bilinearly upsampled saliency;
    ``pixels_per_step`` per step (None: the image width, i.e. 224 on a
    224x224 image); deletion substrate 0, insertion substrate RISE's
    Gaussian blur (kernel 11, sigma 5). The curve has the unperturbed point
    first (S + 1 points in all) and the AUC is the trapezoid rule on x in
    [0, 1].

    Args:
      variables: model variables.
      images_BxHxWx3: normalised model inputs.
      saliency_Bxhxw: saliency at any resolution.
      pixels_per_step: pixels processed per step.
      classes_B: tracked classes; None for the predicted ones.
      modes: which of 'deletion', 'insertion' to compute.
      num_valid: curves of the first ``num_valid`` images only (see
        ``curves``); None: all.

    Returns:
      ``{mode}_curve`` (B, S + 1) and ``{mode}_auc`` (B,) numpy arrays.
    """
    images = jnp.asarray(images_BxHxWx3, jnp.float32)
    ranks, thresholds = standard_order(saliency_Bxhxw, images.shape[1:3],
                                       pixels_per_step)
    blurred = gaussian_blur(images) if "insertion" in modes else None
    return self._run(variables, images, ranks, thresholds,
                     jnp.zeros_like(images), blurred, modes, classes_B,
                     num_valid)


# -- localisation ----------------------------------------------------------------
def box_to_mask(boxes_Bx4, size: tuple[int, int]) -> np.ndarray:
  """(ymin, xmin, ymax, xmax) boxes in pixels (max exclusive) -> (B, H, W)."""
  boxes = np.asarray(boxes_Bx4, np.float32)
  yy, xx = np.mgrid[0:size[0], 0:size[1]]
  return ((yy[None] >= boxes[:, 0, None, None]) & (yy[None] < boxes[:, 2, None, None])
          & (xx[None] >= boxes[:, 1, None, None])
          & (xx[None] < boxes[:, 3, None, None])).astype(np.float32)


def _at_input_resolution(saliency, masks_BxHxW):
  masks = jnp.asarray(masks_BxHxW, jnp.float32)
  if masks.ndim != 3:
    raise ValueError(f"masks must be (B, H, W); got shape {masks.shape}.")
  return upsample(saliency, masks.shape[1:]), masks


@functools.partial(jax.jit, static_argnames="tolerance")
def pointing_game(saliency_Bxhxw, masks_BxHxW,
                  tolerance: float = POINTING_TOLERANCE) -> jax.Array:
  """Hit (1.0) when the saliency maximum at input resolution lies within
  ``tolerance`` pixels (Euclidean, inclusive) of a mask pixel.

  Args:
    saliency_Bxhxw: saliency at any resolution (upsampled bilinearly).
    masks_BxHxW: ground-truth masks ({0, 1}); boxes via ``box_to_mask``.
    tolerance: pixels.

  Returns:
    (B,) float32 of 0/1 (0 for an empty mask).
  """
  sal, masks = _at_input_resolution(saliency_Bxhxw, masks_BxHxW)
  b, hh, ww = sal.shape
  peak = jnp.argmax(sal.reshape(b, -1), axis=1)
  py, px = peak // ww, peak % ww
  yy = jnp.arange(hh)[None, :, None]
  xx = jnp.arange(ww)[None, None, :]
  dist2 = (yy - py[:, None, None]) ** 2 + (xx - px[:, None, None]) ** 2
  near = dist2 <= tolerance * tolerance
  return jnp.any(near & (masks > 0.5), axis=(1, 2)).astype(jnp.float32)


# Score-CAM's energy pointing game (Wang et al. 2020) counts only images
# whose bounding box covers less than half of the image.
BOX_PROTOCOL_MAX_COVERAGE = 0.5


@functools.partial(jax.jit, static_argnames="max_coverage")
def energy_pointing_game(saliency_Bxhxw, masks_BxHxW,
                         max_coverage: float | None = None) -> jax.Array:
  """Share of the (ReLU, max-normalised) saliency energy inside the mask.

  Args:
    saliency_Bxhxw: saliency at any resolution (upsampled bilinearly).
    masks_BxHxW: ground-truth masks ({0, 1}); boxes via ``box_to_mask``.
    max_coverage: with Score-CAM's box protocol, ``BOX_PROTOCOL_MAX_COVERAGE``:
      images whose mask covers that share of the image or more give NaN
      (left out of the mean); None keeps every image.

  Returns:
    (B,) float32 in [0, 1] (0 for an all-zero saliency; NaN for an image
    the coverage filter leaves out).
  """
  sal, masks = _at_input_resolution(saliency_Bxhxw, masks_BxHxW)
  sal = jax.nn.relu(sal)
  peak = jnp.max(sal, axis=(1, 2), keepdims=True)
  sal = sal / jnp.where(peak > 0, peak, 1.0)
  total = jnp.sum(sal, axis=(1, 2))
  inside = jnp.sum(sal * (masks > 0.5), axis=(1, 2))
  energy = jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)
  if max_coverage is None:
    return energy
  coverage = jnp.mean((masks > 0.5).astype(jnp.float32), axis=(1, 2))
  return jnp.where(coverage < max_coverage, energy, jnp.nan)
