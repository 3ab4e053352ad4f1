"""End-to-end of the evaluation entry point on a tiny (untrained) checkpoint."""

import csv
import json
import os

import jax
import numpy as np
import pytest

from brnpa_jax.explain import evaluate, metrics
from brnpa_jax.runs import RunError
from brnpa_jax.train.trainer import Trainer
from helpers import FAST_PRNG, tiny_config

pytestmark = pytest.mark.slow  # trains or compiles end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_state(shapes):
  """He-scaled random kernels, unit BatchNorm: a working untrained model
  without compiling the initialiser (most of this test's time otherwise)."""
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name and "params" in name:
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.normal(size=s.shape) * np.sqrt(2 / fan_in)).astype(s.dtype)
    if name.endswith(("scale']", "var']")) and "opt_state" not in name:
      return np.ones(s.shape, s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tfds_dir):
  """A run whose best checkpoint is a random state, with config.json."""
  root = tmp_path_factory.mktemp("eval")
  # runlocal's data: the session's other tests generate the same dataset.
  config = tiny_config(tfds_dir)
  run = root / "brnpa"
  trainer = Trainer(config, str(run))
  state = _random_state(trainer.state_shapes)
  trainer.ckpt.save(1, state, {"best_val_accuracy": 0.0, "best_step": 1,
                               "epoch": 1}, best=True)
  trainer.ckpt.wait_until_finished()
  trainer.close()
  with open(run / "config.json", "w") as f:
    f.write(config.to_json())
  return run


@pytest.fixture(scope="module")
def result(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("out")
  # rbg keys: the randomisation checks' re-initialisation compiles 5x faster.
  with jax.default_prng_impl(FAST_PRNG):
    assert evaluate.main([
        "--workdir", str(workdir), "--methods", "own,gradcam", "--split",
        "test", "--num_images", "6", "--batch_size", "4", "--chunk_size", "16",
        "--protocol", "both", "--metrics", "randomisation",
        "--randomisation_tests", "cascading,random_logit", "--out",
        str(out)]) == 0
  return out


def test_tables_hold_every_metric(result):
  saved = json.load(open(result / "results.json"))
  rows = {(r["row"], r["metric"]): r for r in saved["results"]}
  assert saved["reference"] == "brnpa/own"
  assert saved["info"]["num_images"] == 6  # 4 + 2: the padding is dropped
  for method in ("own", "gradcam"):
    for metric in ("accuracy", "sparsity", "dauc", "iauc", "dauc_std",
                   "iauc_std", "pointing", "energy"):
      r = rows[(f"brnpa/{method}", metric)]
      assert r["n"] == 6 and 0.0 <= r["mean"] <= 1.0 and r["ci95"] >= 0.0
  assert rows[("brnpa/own", "dauc")]["p_vs_reference"] is None
  assert 0.0 <= rows[("brnpa/gradcam", "dauc")]["p_vs_reference"] <= 1.0
  # Same images, same model: the accuracy is shared by both rows.
  assert (rows[("brnpa/own", "accuracy")]["mean"]
          == rows[("brnpa/gradcam", "accuracy")]["mean"])
  with open(result / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == len(saved["results"])
  table = open(result / "results.md").read()
  assert "| brnpa/gradcam |" in table and "Wilcoxon" in table
  per_image = np.load(result / "per_image.npz")
  assert per_image["brnpa/own/deletion_curve"].shape == (6, 64)  # 8x8 cells
  assert per_image["brnpa/own/deletion_curve_std"].shape == (6, 65)


def test_figures_written(result):
  for name in ("methods_grid.png", "curves.png"):
    assert os.path.getsize(result / name) > 1000


def test_randomisation_checks(result):
  """--metrics randomisation: a row per (maps, test, layer, measure) of the
  six images in results.json and results.md, and the figure."""
  saved = json.load(open(result / "results.json"))
  rows = saved["randomisation"]
  layers = saved["info"]["randomisation"]["layers"]["brnpa"]
  assert layers[0] == "classifier" and len(layers) > 2
  for method in ("own", "gradcam"):
    mine = [r for r in rows if r["row"] == f"brnpa/{method}"]
    assert len(mine) == 4 * (len(layers) + 1)  # 4 measures x (layers + 1)
    for r in mine:
      assert r["test"] in ("cascading", "random_logit")
      assert 0 < r["n"] <= 6 and -1.0 <= r["mean"] <= 1.0 + 1e-6, r
  # BR-NPA's own map does not depend on the class: unchanged by the class.
  logit = {r["measure"]: r for r in rows
           if r["row"] == "brnpa/own" and r["test"] == "random_logit"}
  assert sorted(logit) == ["hog", "spearman", "spearman_abs", "ssim"]
  for r in logit.values():
    assert r["n"] == 6 and abs(r["mean"] - 1.0) < 1e-5, r
  table = open(result / "results.md").read()
  assert "## Randomisation checks" in table
  assert "| brnpa/gradcam | cascading | classifier | " in table
  assert "| brnpa/own | random_logit | - | 6 | 1.000 ± 0.000 |" in table
  assert os.path.getsize(result / "randomisation.png") > 1000


def test_workdir_and_flag_errors(tmp_path):
  with pytest.raises(RunError, match="not a training workdir"):
    evaluate.load_run(str(tmp_path))
  with pytest.raises(ValueError, match="once per workdir"):
    evaluate._per_workdir(["a", "b"], ["w1", "w2", "w3"], "--methods", "own")


def test_metric_names_are_checked_before_anything_runs(tmp_path, capsys):
  for flag, value, valid in (("--metrics", "road,randomisations",
                              "randomisation, randomisation_smooth"),
                             ("--randomisation_tests", "cascading,smooth",
                              "random_logit, efficient")):
    argv = ["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), flag,
            value]
    assert evaluate.main(argv) == 2
    assert valid in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")


def test_statistics():
  mean, half = evaluate.mean_ci([1.0, 2.0, 3.0])
  # t(0.975, 2) = 4.303; sd 1; half-width 4.303 / sqrt(3)
  assert mean == 2.0 and abs(half - 4.302653 / np.sqrt(3)) < 1e-5
  assert evaluate.paired_p([1, 2, 3], [1, 2, 3]) == 1.0
  a = np.arange(20.0)
  assert evaluate.paired_p(a + 1.0, a) < 1e-3


def test_explainer_options():
  assert evaluate.parse_options(["rise.num_masks=1000", "rise.keep=0.5",
                                 "integrated_gradients.baseline=black"]) == {
      "rise": {"num_masks": 1000, "keep": 0.5},
      "integrated_gradients": {"baseline": "black"}}
  with pytest.raises(ValueError, match="METHOD.NAME=VALUE"):
    evaluate.parse_options(["num_masks=3"])
  with pytest.raises(ValueError, match="rise takes"):
    evaluate.parse_options(["rise.masks=3"])


def test_bfloat16_perturbation_forwards(workdir, result):
  """--dtype bfloat16: the deletion/insertion forwards run in bfloat16 and
  the AUC means stay within the stated tolerance of float32 (the float32
  figures are the module's evaluation of the same images)."""
  saved = np.load(result / "per_image.npz")
  run = evaluate.load_run(str(workdir))
  evaluator = evaluate.Evaluator(run, ("release",), 16, "part_mask",
                                 dtype="bfloat16")
  jaxpr = str(jax.make_jaxpr(evaluator.curves.apply_fn)(
      run.variables, np.zeros((1, 64, 64, 3), np.float32)))
  assert "bf16[" in jaxpr
  values = {"dauc": [], "iauc": [], "deletion_curve": [], "accuracy": [],
            "sparsity": []}
  for batch, n in evaluate.iterate_split(run.config, "test", 4, 6, "part_mask"):
    out = evaluator.batch(batch, ["own"], n)["own"]
    for k in values:
      values[k].append(out[k])
  values = {k: np.concatenate(v) for k, v in values.items()}
  float32 = {k: saved[f"brnpa/own/{k}"] for k in values}
  # The run's own forward (accuracy, maps) stays float32; the curves move.
  for k in ("accuracy", "sparsity"):
    np.testing.assert_array_equal(values[k], float32[k])
  assert not np.array_equal(values["deletion_curve"], float32["deletion_curve"])
  for k in ("dauc", "iauc"):
    assert abs(values[k].mean() - float32[k].mean()) <= metrics.BF16_AUC_TOLERANCE
