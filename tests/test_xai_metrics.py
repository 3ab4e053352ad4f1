"""The Quantus-family metrics: properties that pin their definitions, the
imputation on a case with a known answer, and ``evaluate --metrics`` end to
end (the values against Quantus: tests/test_quantus_golden.py)."""

import json

import numpy as np
import pytest

from brnpa_jax.explain import (complexity, evaluate, imputation, localisation,
                               metrics)


def test_complexity_on_known_maps():
  n = 64
  binary = np.zeros((1, 8, 8), np.float32)
  binary[0, :2] = 1.0  # 16 of 64 pixels
  gini = float(complexity.sparseness(binary)[0])
  sparsity = float(metrics.sparsity(binary[:, None])[0])
  assert abs(sparsity - 16 / n) < 1e-4 and abs(gini - (1 - 16 / n)) < 1e-4
  uniform = np.ones((1, 8, 8), np.float32)
  assert abs(float(complexity.entropy(uniform)[0]) - np.log(n)) < 1e-5
  assert abs(float(complexity.entropy(binary)[0]) - np.log(16)) < 1e-5
  assert abs(float(complexity.sparseness(uniform)[0])) < 1e-6


def test_localisation_on_known_maps():
  rng = np.random.default_rng(0)
  maps = rng.random((3, 16, 16)).astype(np.float32)
  masks = np.zeros((3, 16, 16), np.float32)
  masks[:, 4:10, 2:12] = 1
  masks[2] = 0  # empty: NaN, as Quantus
  # Mass accuracy is the energy pointing game without its ReLU.
  mass = np.asarray(localisation.relevance_mass_accuracy(maps, masks))
  energy = np.asarray(metrics.energy_pointing_game(maps, masks))
  np.testing.assert_allclose(mass[:2], energy[:2], rtol=1e-5)
  assert np.isnan(mass[2])
  # A map that is the mask (plus a little order) ranks the mask first.
  perfect = masks + 1e-3 * maps
  rank = np.asarray(localisation.relevance_rank_accuracy(perfect, masks))
  assert rank[0] == rank[1] == 1.0 and np.isnan(rank[2])
  top = np.asarray(localisation.top_k_intersection(perfect, masks, k=30))
  assert top[0] == 1.0
  with pytest.raises(ValueError, match="k must be"):
    localisation.top_k_intersection(maps, masks, k=257)


def test_imputation_restores_a_linear_image():
  """A linear function is its neighbours' weighted mean: removed interior
  pixels are restored exactly, and noise lands only on them."""
  yy, xx = np.mgrid[0:12, 0:12]
  image = np.stack([0.3 * yy - 0.2 * xx, xx * 0.1, yy * 0.0 + 2.0], -1)[None]
  removed = np.zeros((1, 12, 12), bool)
  removed[0, 3:9, 4:10] = True
  out = np.asarray(imputation.impute(image.astype(np.float32), removed))
  np.testing.assert_allclose(out, image, atol=1e-5)
  noise = np.full(image.shape, 0.5, np.float32)
  noisy = np.asarray(imputation.impute(image.astype(np.float32), removed, noise))
  np.testing.assert_allclose(noisy - out, 0.5 * removed[..., None] *
                             np.ones(3), atol=1e-5)


def test_evaluate_reports_the_metrics(finished_run, tmp_path):
  out = tmp_path / "eval"
  # The cheap ones (each metric's values: tests/test_quantus_golden.py).
  names = ["entropy", "sparseness", "mass_accuracy", "top_k",
           "max_sensitivity", "avg_sensitivity"]
  argv = ["--workdir", str(finished_run.workdir), "--methods", "own",
          "--num_images", "4", "--batch_size", "4", "--chunk_size", "64",
          "--metrics", ",".join(names), "--nofigures", "--out", str(out)]
  assert evaluate.main(argv) == 0
  saved = json.load(open(out / "results.json"))
  assert saved["info"]["metrics"] == names
  rows = {r["metric"]: r for r in saved["results"]}
  for column in names:
    assert column in rows, column
  for column in ("mass_accuracy", "top_k", "sparseness"):
    assert 0.0 <= rows[column]["mean"] <= 1.0, column
  assert rows["max_sensitivity"]["mean"] >= rows["avg_sensitivity"]["mean"]
  assert "entropy ↓" in open(out / "results.md").read()


def test_unknown_metric_is_one_line(tmp_path, capsys):
  assert evaluate.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--metrics", "road,nope"]) == 2
  err = capsys.readouterr().err.strip()
  assert "nope" in err and "faithfulness_correlation" in err
  assert len(err.splitlines()) <= 2 and "Traceback" not in err


def test_top_mask_is_a_stable_sort():
  """The sort-free top-k takes what a stable descending sort takes first,
  ties included, for any sign and any k."""
  rng = np.random.default_rng(1)
  a = rng.integers(-3, 4, (5, 40)).astype(np.float32) * 0.5  # many ties
  a[0] = rng.normal(size=40)
  k = np.array([0, 1, 7, 39, 40])
  order = np.argsort(-a, axis=1, kind="stable")
  want = np.zeros(a.shape, bool)
  for i, kk in enumerate(k):
    want[i, order[i, :kk]] = True
  np.testing.assert_array_equal(localisation.top_mask(a, k), want)
