"""Ranked-map overlays."""

import numpy as np
from PIL import Image

from brnpa_jax.explain.overlay import (RANK_COLOURS, rank_overlay,
                                       save_overlay_grid, weighted_maps)


def test_weighted_maps_scale_and_zero_safety():
  maps = np.zeros((2, 4, 4), np.float32)
  maps[0, 1, 1] = 1.0
  norms = np.full((4, 4), 2.0, np.float32)
  w = weighted_maps(maps, norms)
  assert w[0].max() == 1.0 and np.all(w[1] == 0)  # an all-zero rank stays zero


def test_overlay_paints_each_rank_in_its_colour():
  image = np.full((16, 16, 3), 128, np.uint8)
  maps = np.zeros((2, 4, 4), np.float32)
  maps[0, 0, 0] = 1.0  # rank 1 top-left
  maps[1, 3, 3] = 1.0  # rank 2 bottom-right
  out = rank_overlay(image, maps, np.ones((4, 4), np.float32), alpha=1.0)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out[0, 0] / 255, RANK_COLOURS[0], atol=0.02)
  np.testing.assert_allclose(out[15, 15] / 255, RANK_COLOURS[1], atol=0.02)
  assert abs(int(out[8, 2, 0]) - 128) < 40  # far from both maps: mostly image


def test_grid_png(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
  maps = rng.random((2, 3, 4, 4)).astype(np.float32)
  path = save_overlay_grid(str(tmp_path / "sub" / "grid.png"), images, maps,
                           rng.random((2, 4, 4)), ["a", "b"])
  with Image.open(path) as im:
    assert im.size[0] > im.size[1] > 100  # two rows of five panels
