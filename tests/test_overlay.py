"""Ranked-map overlays."""

import numpy as np
import pytest
from PIL import Image

from brnpa_jax.explain import overlay, plots
from brnpa_jax.explain.overlay import (RANK_COLOURS, heat_overlay, norm_shares,
                                       rank_overlay, save_overlay_grid,
                                       weighted_maps)


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


def _png_size(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # the PNG signature
  with Image.open(path) as im:
    im.verify()  # checks the chunks' CRCs
  with Image.open(path) as im:
    return im.size


def test_norm_shares_split_each_position_by_map_value():
  maps = np.zeros((2, 2, 2), np.float32)
  maps[0, 0, 0] = 1.0                        # rank 1 only: norm 3
  maps[0, 1, 1], maps[1, 1, 1] = 1.0, 3.0    # split 1:3 of norm 4
  maps[1, 0, 1] = 2.0                        # rank 2 only: norm 1
  norms = np.array([[3.0, 1.0], [2.0, 4.0]])  # (1, 0) uncovered: norm 2
  np.testing.assert_allclose(norm_shares(maps, norms), [4 / 10, 4 / 10])
  assert np.all(norm_shares(maps, np.zeros((2, 2))) == 0)


def test_heat_overlay_resizes_and_colours():
  image = np.zeros((16, 24, 3), np.uint8)
  m = np.zeros((4, 6), np.float32)
  m[0, 0] = 1.0
  out = heat_overlay(image, m, alpha=1.0)
  assert out.shape == (16, 24, 3) and out.dtype == np.uint8
  assert out[0, 0, 0] > 100 and out[0, 0, 2] < 50  # jet: hot is red
  assert out[15, 23, 2] > 100 and out[15, 23, 0] < 50  # cold is blue


def test_grid_png_has_figure_size_and_rank_legend(tmp_path, monkeypatch):
  """Two rows of image, all ranks, then each rank; the all-ranks panel's
  legend gives each rank's colour and share of the norm."""
  figures = []
  save = overlay.save_figure
  monkeypatch.setattr(overlay, "save_figure",
                      lambda fig, path: figures.append(fig) or save(fig, path))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
  maps, norms = rng.random((2, 3, 4, 4)), rng.random((2, 4, 4))
  path = save_overlay_grid(str(tmp_path / "sub" / "g.png"), images, maps, norms,
                           ["a", "b"])
  assert _png_size(path) == (round(1.9 * 5 * 110), round((1.9 * 2 + 0.3) * 110))
  axes = np.reshape(figures[0].axes, (2, 5))
  for i, title in enumerate(["a", "b"]):
    shares = norm_shares(maps[i], norms[i])
    assert axes[i, 0].get_title() == title
    legend = axes[i, 1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        f"{r + 1}: {s:.0%}" for r, s in enumerate(shares)]
    for r, patch in enumerate(legend.get_patches()):
      np.testing.assert_allclose(patch.get_facecolor()[:3], RANK_COLOURS[r])
      assert axes[i, r + 2].get_title() == f"rank {r + 1} ({shares[r]:.0%})"


def test_method_grid_and_curves_png(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (3, 24, 40, 3), dtype=np.uint8)
  maps = {"Grad-CAM": rng.random((3, 24, 40)), "RISE": rng.random((3, 6, 10))}
  path = plots.save_method_grid(str(tmp_path / "m" / "grid.png"), images, maps,
                                row_titles=["a", "b", "c"], dpi=50)
  assert _png_size(path) == (round(1.6 * 3 * 50), round((1.6 * 3 + 0.2) * 50))
  x = np.linspace(0, 1, 11)
  curves = {"own": (x, 1 - x), "gradcam": (x, (1 - x) ** 2)}
  path = plots.save_curve_panels(str(tmp_path / "c.png"),
                                 {"deletion": curves, "insertion": curves}, dpi=60)
  assert _png_size(path) == (round(7.2 * 60), round(3.0 * 60))
  path = plots.save_curves(str(tmp_path / "d.png"), curves, title="deletion")
  assert _png_size(path) == (round(3.6 * 110), round(3.0 * 110))
  with pytest.raises(ValueError, match="maps for 3 images"):
    plots.save_method_grid(str(tmp_path / "x.png"), images, {"a": maps["RISE"][:2]})
  with pytest.raises(ValueError, match="1-D"):
    plots.save_curves(str(tmp_path / "x.png"), {"a": (x, x[:3])})
