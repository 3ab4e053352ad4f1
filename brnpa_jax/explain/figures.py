"""Draws what a run asks for at its end (a task's ``Visual``).

``train.py`` passes ``draw`` to the trainer, which calls it on process 0 with
the best state's ``Visual``; the tasks themselves never draw.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from brnpa_jax.explain.overlay import rank_overlay, save_figure, save_overlay_grid
from brnpa_jax.tasks.base import Visual


def save_retrieval_figure(path: str, images, maps, norms, *, query_ids,
                          query_cams, gallery_ids, gallery_cams, distances) -> str:
  """One row per query: its ranked maps, then those of its top-n retrievals.

  Args:
    path: output PNG (folders are created).
    images: uint8 (Q + Q*n, H, W, 3): the Q queries, then each query's n
      retrievals in rank order.
    maps: (Q + Q*n, K, h, w) attention maps; norms: (Q + Q*n, h, w).
    query_ids, query_cams: (Q,).
    gallery_ids, gallery_cams, distances: (Q, n) of the retrievals.

  Returns:
    The path written. Titles of true matches are green, others red.
  """
  nq, n = gallery_ids.shape
  fig, axes = plt.subplots(nq, n + 1, figsize=(1.3 * (n + 1), 2.4 * nq + 0.2),
                           squeeze=False)
  for i in range(nq):
    axes[i, 0].imshow(rank_overlay(images[i], maps[i], norms[i]))
    axes[i, 0].set_title(f"query id {query_ids[i]}\ncam {query_cams[i]}", fontsize=7)
    for j in range(n):
      r = nq + i * n + j
      hit = gallery_ids[i, j] == query_ids[i]
      axes[i, j + 1].imshow(rank_overlay(images[r], maps[r], norms[r]))
      axes[i, j + 1].set_title(
          f"#{j + 1} id {gallery_ids[i, j]} c{gallery_cams[i, j]}\n"
          f"d={distances[i, j]:.2f}", fontsize=7,
          color="green" if hit else "red")
  for ax in axes.ravel():
    ax.axis("off")
  fig.tight_layout()
  return save_figure(fig, path)


def draw(visual: Visual, path: str) -> str:
  """Draws ``visual`` into the PNG ``path`` (folders are created); returns it."""
  d = visual.data
  if visual.kind == "ranked_maps":
    return save_overlay_grid(path, d["images"], d["maps"], d["norms"], d["titles"])
  if visual.kind == "retrieval":
    return save_retrieval_figure(
        path, d["images"], d["maps"], d["norms"], query_ids=d["query_ids"],
        query_cams=d["query_cams"], gallery_ids=d["gallery_ids"],
        gallery_cams=d["gallery_cams"], distances=d["distances"])
  raise ValueError(f"Unknown visual kind {visual.kind!r}; valid: ranked_maps, "
                   "retrieval.")
