"""Metrics, and RISE on the same toy model, on constructed cases whose answers
are worked out by hand."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from brnpa_jax.errors import ConfigError
from brnpa_jax.explain import evaluate, explainers, metrics

# An 8x8 image seen as a 4x4 feature map (2x2-pixel cells). The toy model
# only looks at four scattered cells R: the probability of class 0 is
# 0.05 + 0.9 * (share of R's pixels brighter than 0.5).
CELLS = 4
REGION_CELLS = [(0, 3), (1, 1), (2, 2), (3, 0)]


def _region():
  cells = np.zeros((CELLS, CELLS), np.float32)
  for r, c in REGION_CELLS:
    cells[r, c] = 1
  return cells, np.kron(cells, np.ones((2, 2), np.float32))


def toy_apply(variables, images_BxHxWx3):
  region = variables["region"]
  lit = (images_BxHxWx3[..., 0] > 0.5).astype(jnp.float32)
  q = 0.05 + 0.9 * jnp.sum(lit * region, (1, 2)) / jnp.sum(region)
  return jnp.log(jnp.stack([q, 1 - q], -1))


@pytest.fixture(scope="module")
def case():
  cells, pixels = _region()
  # The image is bright exactly on R; blurring leaves R dark (< 0.5).
  image = np.repeat(pixels[..., None], 3, -1)
  rng = np.random.default_rng(0)
  perfect = np.where(cells > 0, 1.0, rng.uniform(0, 0.5, cells.shape))
  inverted = 1.0 - perfect
  images = np.stack([image, image])
  return {"variables": {"region": jnp.asarray(pixels)}, "images": images,
          "saliency": np.stack([perfect, inverted]).astype(np.float32),
          "pixels": pixels,
          "curves": metrics.PerturbationCurves(toy_apply, chunk_size=5)}


def _auc(points):
  points = np.asarray(points, np.float64)
  return np.trapezoid(points, np.linspace(0, 1, len(points)))


def test_release_protocol_one_step_per_cell(case):
  out = case["curves"].release(case["variables"], case["images"],
                               case["saliency"])
  s = np.arange(1, 17)  # cells processed after each of the 16 steps
  q = lambda lit: 0.05 + 0.9 * lit / 4
  want = {
      # perfect: R's 4 cells go first; inverted: last.
      "deletion": [q(np.maximum(4 - s, 0)), q(np.clip(16 - s, 0, 4))],
      "insertion": [q(np.minimum(s, 4)), q(np.clip(s - 12, 0, 4))],
  }
  for mode, (perfect, inverted) in want.items():
    np.testing.assert_allclose(out[f"{mode}_curve"], [perfect, inverted],
                               atol=1e-6)
    np.testing.assert_allclose(out[f"{mode}_auc"],
                               [_auc(perfect), _auc(inverted)], atol=1e-6)
  # By hand: perfect deletion records 0.725, 0.5, 0.275, then 13 x 0.05, at
  # x = 0, 1/15, ..., 1; the trapezoid halves the two ends.
  np.testing.assert_allclose(out["deletion_auc"][0],
                             (0.725 / 2 + 0.5 + 0.275 + 0.05 * 12 + 0.05 / 2)
                             / 15, atol=1e-6)
  assert out["deletion_auc"][0] < out["deletion_auc"][1]
  assert out["insertion_auc"][0] > out["insertion_auc"][1]


def test_release_protocol_fewer_steps(case):
  out = case["curves"].release(case["variables"], case["images"],
                               case["saliency"], steps=8,
                               modes=("deletion",))
  s = np.arange(1, 9)  # two cells per step
  want = 0.05 + 0.9 * np.maximum(4 - 2 * s, 0) / 4
  np.testing.assert_allclose(out["deletion_curve"][0], want, atol=1e-6)
  assert "insertion_auc" not in out


def test_standard_protocol(case):
  # Pixel-level saliency; 8 pixels per step, so 9 points with the unperturbed.
  perfect = case["pixels"] + 0.01 * np.arange(64).reshape(8, 8) / 64
  sal = np.stack([perfect, 1 - perfect]).astype(np.float32)
  out = case["curves"].standard(case["variables"], case["images"], sal,
                                pixels_per_step=8)
  k = np.arange(9) * 8  # pixels processed; R has 16 pixels
  q = lambda lit: 0.05 + 0.9 * lit / 16
  want = {"deletion": [q(np.maximum(16 - k, 0)), q(np.clip(64 - k, 0, 16))],
          "insertion": [q(np.minimum(k, 16)), q(np.clip(k - 48, 0, 16))]}
  for mode, (good, bad) in want.items():
    np.testing.assert_allclose(out[f"{mode}_curve"], [good, bad], atol=1e-6)
    np.testing.assert_allclose(out[f"{mode}_auc"], [_auc(good), _auc(bad)],
                               atol=1e-6)


def test_curves_compile_once_per_shape(case):
  # The toy model is traced once for the chunks, once for the predictions.
  curves = metrics.PerturbationCurves(chex.assert_max_traces(toy_apply, n=2),
                                      chunk_size=4)
  for _ in range(2):  # 16 steps x 2 images = 8 chunks per call, all alike
    curves.release(case["variables"], case["images"], case["saliency"],
                   modes=("deletion",))


class _ToyClassifier:
  """``toy_apply`` as the explainers call a classifier: apply -> (logits, aux)."""
  num_classes = 2

  def apply(self, variables, images_BxHxWx3):
    return toy_apply(variables, images_BxHxWx3), {}


def test_rise_on_the_toy_model_is_its_weighted_mask_sum(case):
  """RISE's saliency is sum_i P(class 0 | x * M_i) M_i / (N p). The image is
  1 on R and 0 elsewhere, so x * M_i is lit (> 0.5) exactly where R meets
  M_i > 0.5: P = 0.05 + 0.9 * (share of R's pixels with M_i > 0.5). The map
  then weighs R above the rest of the image."""
  num_masks, cells, keep = 64, 4, 0.5
  rng = jax.random.key(5)
  got = np.asarray(explainers.explain(
      "rise", _ToyClassifier(), case["variables"], case["images"],
      np.zeros(2, np.int32), rng=rng, num_masks=num_masks, cells=cells,
      keep=keep, chunk=16))
  masks = np.asarray(explainers.rise_masks(rng, jnp.arange(num_masks), (8, 8),
                                           cells, keep), np.float64)
  region = case["pixels"] > 0
  probs = 0.05 + 0.9 * (masks[:, region] > 0.5).mean(1)
  sal = np.einsum("n,nhw->hw", probs, masks) / (num_masks * keep)
  want = (sal - sal.min()) / (sal.max() - sal.min())
  np.testing.assert_allclose(got, np.stack([want, want]), atol=1e-5)
  assert want[region].mean() > want[~region].mean() + 0.1


def test_substrates():
  ones = np.ones((1, 9, 9, 1), np.float32)
  box = np.asarray(metrics.box_blur(ones, 5))
  # Zero padding: the corner window holds 3x3 of the image's pixels.
  np.testing.assert_allclose(box[0, 0, 0, 0], 9 / 25, rtol=1e-6)
  np.testing.assert_allclose(box[0, 4, 4, 0], 1.0, rtol=1e-6)
  kernel = metrics.rise_kernel()
  assert kernel.shape == (11, 11) and abs(kernel.sum() - 1) < 1e-5
  x = np.random.default_rng(1).normal(size=(1, 16, 16, 2)).astype(np.float32)
  got = np.asarray(metrics.gaussian_blur(x))
  for c in range(2):
    want = ndimage.convolve(x[0, :, :, c], kernel, mode="constant")
    np.testing.assert_allclose(got[0, :, :, c], want, atol=1e-5)


def test_pointing_game_tolerance_edge():
  mask = np.zeros((4, 64, 64), np.float32)
  mask[:, 10, 10] = 1
  sal = np.zeros((4, 64, 64), np.float32)
  sal[0, 25, 10] = 1  # 15 px below: hit
  sal[1, 26, 10] = 1  # 16 px: miss
  sal[2, 19, 22] = 1  # 9-12-15 triangle: exactly 15 px, hit
  sal[3, 10, 26] = 1  # 16 px right: miss
  np.testing.assert_array_equal(metrics.pointing_game(sal, mask), [1, 0, 1, 0])
  np.testing.assert_array_equal(
      metrics.pointing_game(sal, mask, tolerance=16), [1, 1, 1, 1])
  box = metrics.box_to_mask([[41, 0, 51, 64]], (64, 64))  # rows 41..50
  assert box.sum() == 10 * 64
  np.testing.assert_array_equal(metrics.pointing_game(sal[:2], box[[0, 0]]),
                                [0, 1])  # rows 25 and 26: 16 and 15 px away


def test_energy_pointing_game():
  sal = np.zeros((2, 8, 8), np.float32)
  sal[0, :, :4] = 2.0
  sal[0, :, 4:] = 1.0  # normalised: 1 inside, 0.5 outside
  sal[1] = -1.0  # ReLU leaves nothing
  mask = np.zeros((2, 8, 8), np.float32)
  mask[:, :, :4] = 1
  np.testing.assert_allclose(metrics.energy_pointing_game(sal, mask),
                             [2 / 3, 0.0], atol=1e-6)


def test_energy_pointing_game_box_protocol_leaves_out_large_boxes():
  """Score-CAM's protocol: only boxes under half the image count."""
  sal = np.zeros((2, 8, 8), np.float32)
  sal[:, :, :2] = 1.0
  boxes = np.array([[0, 0, 8, 3], [0, 0, 8, 5]], np.float32)  # 37.5%, 62.5%
  masks = metrics.box_to_mask(boxes, (8, 8))
  keep = metrics.energy_pointing_game(sal, masks, max_coverage=0.5)
  np.testing.assert_allclose(keep[0], 1.0, atol=1e-6)
  assert np.isnan(keep[1])
  np.testing.assert_allclose(metrics.energy_pointing_game(sal, masks), [1.0, 1.0],
                             atol=1e-6)
  # The summary's statistics leave the NaN out (n counts the images kept).
  rows = evaluate.summarise({"a/own": {"energy": np.asarray(keep)},
                             "b/own": {"energy": np.array([0.5, 0.2])}},
                            reference="a/own")
  assert [(r["row"], r["n"], round(r["mean"], 3)) for r in rows] == [
      ("a/own", 1, 1.0), ("b/own", 2, 0.35)]


def test_sparsity():
  one_hot = np.zeros((1, 1, 4, 4), np.float32)
  one_hot[0, 0, 1, 2] = 3.0
  np.testing.assert_allclose(metrics.sparsity(one_hot), [1 / 16 / (1 + 1e-5 / 3)],
                             rtol=1e-6)
  # Norm weighting: a uniform map times a one-hot norm is one-hot again.
  norms = one_hot[:, 0]
  uniform = np.full((1, 3, 4, 4), 1 / 16, np.float32)
  np.testing.assert_allclose(metrics.sparsity(uniform, norms), [1 / 16],
                             rtol=1e-3)
  flat = np.ones((1, 2, 4, 4), np.float32)
  np.testing.assert_allclose(metrics.sparsity(flat), [1 / (1 + 1e-5)], rtol=1e-6)
  zeros = metrics.sparsity(np.zeros((1, 1, 4, 4)), np.zeros((1, 4, 4)))
  assert np.isfinite(zeros).all() and float(zeros[0]) == 0.0
  with pytest.raises(ValueError, match="K axis"):
    metrics.sparsity(np.zeros((2, 4, 4)))


def test_degenerate_saliency_stays_finite(case):
  flat = np.zeros((2, CELLS, CELLS), np.float32)
  out = case["curves"].release(case["variables"], case["images"], flat,
                               modes=("deletion",))
  assert np.isfinite(out["deletion_auc"]).all()
  assert jnp.isfinite(metrics.energy_pointing_game(flat, np.ones((2, 8, 8)))).all()
  with pytest.raises(ValueError, match="steps must be"):
    case["curves"].release(case["variables"], case["images"], flat, steps=17)


def test_to_cells_block_means():
  sal = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
  cells = np.asarray(metrics.to_cells(sal, (4, 4)))
  np.testing.assert_allclose(cells[1, 2, 3], sal[1, 4:6, 6:8].mean())
  assert metrics.to_cells(sal, (3, 3)).shape == (2, 3, 3)


def test_release_protocol_steps_beyond_the_cells_is_a_config_error():
  sal = np.random.default_rng(0).random((2, 3, 3)).astype(np.float32)
  ranks, thresholds = metrics.release_order(sal, (96, 96), 9)
  assert ranks.shape == (2, 96, 96) and thresholds[-1] == 9
  with pytest.raises(ConfigError, match=r"\[1, 9\] \(cells of the 3x3 map\); got 36.*--steps"):
    metrics.release_order(sal, (96, 96), 36)
