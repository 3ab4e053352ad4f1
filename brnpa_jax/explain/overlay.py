"""Ranked attention maps drawn over their images (PNG, via matplotlib).

A map is shown as ``A_k * norm`` (docs/method.md#own-maps: the norm carries how much a
region weighs in the representative vector), scaled to [0, 1] per rank,
upsampled to the image, and drawn in its rank's colour; where ranks overlap
the strongest wins. The legend gives each rank's share of the norm
(``norm_shares``). Single saliency maps (post-hoc explainers) are drawn as a
heat map over the image (``heat_overlay``).
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

# Rank 1 red, 2 green, 3 blue, then further distinct colours.
RANK_COLOURS = np.array([
    [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [245, 130, 48],
], np.float32) / 255.0


def weighted_maps(maps_KxHxW: np.ndarray, norms_HxW: np.ndarray) -> np.ndarray:
  """``A_k * norm`` with each rank scaled to a maximum of 1 (finite always)."""
  w = np.asarray(maps_KxHxW, np.float32) * np.asarray(norms_HxW, np.float32)[None]
  peak = w.reshape(w.shape[0], -1).max(axis=1)
  return w / np.where(peak > 0, peak, 1.0)[:, None, None]


def norm_shares(maps_KxHxW: np.ndarray, norms_HxW: np.ndarray) -> np.ndarray:
  """The share of the image's total norm mass that each rank's map covers.

  Each position's norm is split between the ranks in proportion to their map
  values there (``A_k / sum_j A_j``); a rank's share is the norm it receives
  over the total norm. The shares sum to 1 where the maps cover every
  position (BR-NPA's do), less where all maps are zero.

  Args:
    maps_KxHxW: attention maps, rank order.
    norms_HxW: feature-norm map.

  Returns:
    float (K,) shares in [0, 1] (zeros for an all-zero norm map).
  """
  maps = np.clip(np.asarray(maps_KxHxW, np.float64), 0.0, None)
  norms = np.clip(np.asarray(norms_HxW, np.float64), 0.0, None)
  total = maps.sum(0)
  split = np.divide(maps, total[None], out=np.zeros_like(maps),
                    where=total[None] > 0)
  mass = norms.sum()
  if mass <= 0:
    return np.zeros(maps.shape[0])
  return (split * norms[None]).reshape(maps.shape[0], -1).sum(1) / mass


def heat_overlay(image_HxWx3: np.ndarray, map_HxW: np.ndarray,
                 alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
  """A [0, 1] saliency map as a colour-mapped heat map over a uint8 image.

  The map is resized (bilinear) to the image when their sizes differ; the
  blend is ``(1 - alpha) image + alpha colour(map)``, as pytorch-grad-cam's
  ``show_cam_on_image``.
  """
  m = np.nan_to_num(np.asarray(map_HxW, np.float32))
  if m.shape != image_HxWx3.shape[:2]:
    m = _upsample(m[None], image_HxWx3.shape[:2])[0]
  heat = matplotlib.colormaps[cmap](np.clip(m, 0.0, 1.0))[..., :3]
  out = (1 - alpha) * image_HxWx3.astype(np.float32) / 255.0 + alpha * heat
  return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _upsample(m_KxHxW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  return np.stack([
      np.asarray(Image.fromarray(m).resize(size[::-1], Image.BILINEAR))
      for m in m_KxHxW.astype(np.float32)])


def rank_overlay(image_HxWx3: np.ndarray, maps_KxHxW: np.ndarray,
                 norms_HxW: np.ndarray, alpha: float = 0.7) -> np.ndarray:
  """The image (greyed) with each rank's map in its colour.

  Args:
    image_HxWx3: uint8 image.
    maps_KxHxW: attention maps at feature resolution, rank order.
    norms_HxW: feature-norm map.
    alpha: opacity of the strongest map.

  Returns:
    uint8 (H, W, 3) overlay.
  """
  k = maps_KxHxW.shape[0]
  if k > len(RANK_COLOURS):
    raise ValueError(f"at most {len(RANK_COLOURS)} ranks can be coloured, got {k}.")
  up = _upsample(weighted_maps(maps_KxHxW, norms_HxW), image_HxWx3.shape[:2])
  top = up.argmax(0)
  strength = np.clip(up.max(0), 0.0, 1.0)[..., None] * alpha
  grey = image_HxWx3.astype(np.float32).mean(-1, keepdims=True) / 255.0
  base = 0.5 * grey + 0.5 * image_HxWx3.astype(np.float32) / 255.0
  out = (1 - strength) * base + strength * RANK_COLOURS[top]
  return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_overlay_grid(path: str, images: np.ndarray, maps: np.ndarray,
                      norms: np.ndarray, titles: Sequence[str] | None = None
                      ) -> str:
  """One row per image: the image, all ranks overlaid, then each rank alone.

  The all-ranks panel has a legend: each rank's colour with its share of the
  norm (``norm_shares``); the single-rank panels repeat it in their titles.

  Args:
    path: output PNG path (folders are created).
    images: uint8 (B, H, W, 3).
    maps: (B, K, h, w) attention maps.
    norms: (B, h, w) feature-norm maps.
    titles: optional caption per image (e.g. label and prediction).

  Returns:
    The path written.
  """
  b, k = maps.shape[:2]
  fig, axes = plt.subplots(b, k + 2, figsize=(1.9 * (k + 2), 1.9 * b + 0.3),
                           squeeze=False)
  for i in range(b):
    share = norm_shares(maps[i], norms[i])
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(titles[i] if titles else "image", fontsize=7)
    axes[i, 1].imshow(rank_overlay(images[i], maps[i], norms[i]))
    axes[i, 1].set_title("ranks 1-%d" % k, fontsize=7)
    axes[i, 1].legend(
        handles=[Patch(color=RANK_COLOURS[r], label=f"{r + 1}: {share[r]:.0%}")
                 for r in range(k)],
        title="rank: norm", loc="lower left", fontsize=5, title_fontsize=5,
        framealpha=0.7, handlelength=0.8, borderpad=0.3, labelspacing=0.2)
    for r in range(k):
      only_r = np.zeros_like(maps[i])
      only_r[r] = maps[i, r]  # keeps rank r's colour
      axes[i, r + 2].imshow(rank_overlay(images[i], only_r, norms[i]))
      axes[i, r + 2].set_title(f"rank {r + 1} ({share[r]:.0%})", fontsize=7,
                               color=RANK_COLOURS[r])
  for ax in axes.ravel():
    ax.axis("off")
  fig.tight_layout()
  return save_figure(fig, path)


def save_figure(fig, path: str, dpi: int = 110) -> str:
  """Writes a matplotlib figure as PNG (making its folder) and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path
