"""Figures of explanations: methods side by side, deletion/insertion curves.

Every function writes one PNG (matplotlib, Agg backend) whose pixel size is
``figsize * dpi`` exactly (no tight bounding box), creates missing folders,
and returns the path written.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from brnpa_jax.explain.overlay import heat_overlay, save_figure  # noqa: E402

PANEL_INCHES = 1.6
DPI = 110


def save_method_grid(path: str, images: np.ndarray,
                     maps: Mapping[str, np.ndarray], *,
                     row_titles: Sequence[str] | None = None,
                     alpha: float = 0.5, dpi: int = DPI) -> str:
  """Rows are images, columns the image then one heat map per method.

  Args:
    path: output PNG path.
    images: uint8 (B, H, W, 3).
    maps: method name (column title) -> (B, h, w) saliency in [0, 1]; maps
      at another resolution than the images are resized bilinearly.
    row_titles: optional caption per image (e.g. label and prediction).
    alpha: opacity of the heat maps.
    dpi: resolution; the PNG is ``(1 + len(maps)) * PANEL_INCHES * dpi`` wide.

  Returns:
    The path written.
  """
  images = np.asarray(images)
  b = images.shape[0]
  for name, m in maps.items():
    if np.shape(m)[0] != b:
      raise ValueError(f"maps[{name!r}] has {np.shape(m)[0]} maps for {b} images.")
  if row_titles is not None and len(row_titles) != b:
    raise ValueError(f"{len(row_titles)} row titles for {b} images.")
  cols = 1 + len(maps)
  fig, axes = plt.subplots(b, cols, squeeze=False,
                           figsize=(PANEL_INCHES * cols, PANEL_INCHES * b + 0.2))
  for i in range(b):
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(row_titles[i] if row_titles else "image", fontsize=7)
    for j, (name, m) in enumerate(maps.items(), start=1):
      axes[i, j].imshow(heat_overlay(images[i], np.asarray(m[i]), alpha))
      if i == 0:
        axes[i, j].set_title(name, fontsize=7)
  for ax in axes.ravel():
    ax.axis("off")
  fig.tight_layout(pad=0.3, h_pad=0.8)
  return save_figure(fig, path, dpi)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
  return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def save_curve_panels(path: str,
                      panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                      *, xlabel: str = "fraction of the image perturbed",
                      ylabel: str = "class probability", dpi: int = DPI) -> str:
  """One panel per curve family (e.g. deletion, insertion), a line per method.

  Args:
    path: output PNG path.
    panels: panel title -> {method -> (x, y)} with x, y 1-D arrays of equal
      length (e.g. mean deletion curve over a split); the legend gives each
      method's area under the curve (trapezoid rule).
    xlabel: x-axis label.
    ylabel: y-axis label.
    dpi: resolution; each panel is 3.6 x 3 inches.

  Returns:
    The path written.
  """
  fig, axes = plt.subplots(1, len(panels), squeeze=False,
                           figsize=(3.6 * len(panels), 3.0))
  for ax, (title, curves) in zip(axes[0], panels.items()):
    for name, (x, y) in curves.items():
      x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
      if x.shape != y.shape or x.size < 2:
        raise ValueError(f"{title}/{name}: x and y must be 1-D of one length "
                         f">= 2, got {x.shape} and {y.shape}.")
      ax.plot(x, y, label=f"{name} (AUC {_trapezoid(x, y):.3f})", lw=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  return save_figure(fig, path, dpi)


def save_curves(path: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                *, title: str = "", **kwargs) -> str:
  """One panel of curves, ``method -> (x, y)``; see ``save_curve_panels``."""
  return save_curve_panels(path, {title: curves}, **kwargs)
