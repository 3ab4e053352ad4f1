"""The accelerator benchmark suite: its smoke run (every job at tiny sizes on
the CPU, PyTorch jobs too where torch is installed) and its planning."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from benchmarks import gpu_suite, suite_jax, suite_plan, train_step
from brnpa_jax.models import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _run(args, timeout):
  return subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("suite")
  proc = _run(["--smoke", "--out", str(out)], timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "suite.json") as f:
    return out, json.load(f), proc.stdout


def test_smoke_runs_every_job(smoke):
  out, saved, stdout = smoke
  jobs = saved["jobs"]
  for job in jobs:
    if job["side"] == "torch" and not HAVE_TORCH:
      assert job["status"] == "skipped", job
      assert "torch is not installed" in job["reason"]
    else:
      assert job["status"] == "ok", (job["id"], job.get("reason"))
  ran = {(j["side"], j["kind"]) for j in jobs if j["status"] == "ok"}
  want = {("jax", k) for k in ("peaks", "train", "deletion", "fewshot", "reid",
                               "predict")}
  if HAVE_TORCH:
    want |= {("torch", k) for k in ("train", "infer", "deletion")}
  assert want <= ran
  sweep = next(j for j in jobs if j.get("option_sets"))
  assert set(sweep["result"]["by_options"]) == set(suite_plan.SIZES["smoke"]["options"])
  assert sweep["options_kept"] in sweep["result"]["by_options"]
  table = (out / "suite.md").read_text()
  assert "| 32 | high | 2 | bfloat16 | **" in table  # the headline row
  assert "## Deletion metric" in table and "Re-id train step" in table
  assert "Batch inference, `predict`'s loop" in table
  if not HAVE_TORCH:
    assert "PyTorch columns skipped: torch is not installed" in stdout
  else:
    compiled = next(j for j in jobs if j["id"].startswith("torch compiled/train/"))
    assert compiled["result"]["compile_s"] > 0 and compiled["result"]["img_s"] > 0
    row = next(l for l in table.splitlines() if l.startswith("| 32 | high | 2 | bfloat16 |"))
    assert "x** |" in row  # ours / best compiled


def test_plan_order_and_skips():
  jobs = suite_plan.plan(suite_plan.SIZES["gpu"], torch_ok=True, compile_ok=True)
  ids = [j["id"] for j in jobs]
  assert len(ids) == len(set(ids))
  head = "448/high/b64/bfloat16"
  assert ids[:5] == ["ours/peaks", f"ours/train/{head}", f"torch compiled/train/{head}",
                     f"torch eager/train/{head}", f"torch max-autotune/train/{head}"]
  assert all(j["cap_s"] for j in jobs if j.get("recipe") in ("compiled", "max-autotune"))
  assert set(suite_plan.OPTION_SETS) == set(suite_jax.XLA_OPTION_SETS)
  no_compile = suite_plan.plan(suite_plan.SIZES["gpu"], torch_ok=True, compile_ok=False)
  skipped = {j["id"] for j in no_compile if j.get("skip")}
  assert f"torch compiled/train/{head}" in skipped
  assert f"torch eager/train/{head}" not in skipped
  no_torch = suite_plan.plan(suite_plan.SIZES["gpu"], torch_ok=False, compile_ok=False)
  assert all(j.get("skip") for j in no_torch if j["side"] == "torch")


def test_budget_and_option_choice(tmp_path):
  assert gpu_suite.fits({"est_s": 40}, now=100.0, deadline=150.0, est_scale=1.0)
  assert not gpu_suite.fits({"est_s": 60}, now=100.0, deadline=150.0, est_scale=1.0)
  choose = suite_plan.choose_options
  assert choose({"default": {"img_s": 100.0}, "a": {"img_s": 101.0}}) == "default"
  assert choose({"default": {"img_s": 100.0}, "a": {"img_s": 103.0}}) == "a"
  assert choose({"default": {"error": "x"}, "a": {"img_s": 1.0}}) == "a"
  # A worker past its deadline records the job as skipped, not run.
  spec = tmp_path / "spec.json"
  results = tmp_path / "results.jsonl"
  spec.write_text(json.dumps({
      "ctx": {"est_scale": 1.0}, "deadline": time.time() - 1,
      "results": str(results), "jobs": [{"id": "ours/peaks", "kind": "peaks",
                                         "est_s": 5, "n": 8}]}))
  proc = _run(["--worker", "jax", "--spec", str(spec)], timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(results.read_text())
  assert record["status"] == "skipped" and record["reason"].startswith("budget")


def test_random_state_is_an_initialisation():
  model = train_step.build("brnpa", "high", stage_sizes=(1, 1, 1, 1), width=4,
                           num_classes=5)
  shapes = jax.eval_shape(lambda r: model.init(r, jax.numpy.zeros((1, 32, 32, 3))),
                          jax.random.key(0))
  state = train_step.random_state(shapes)
  conv = np.asarray(state["params"]["backbone"]["conv1"]["kernel"])
  assert abs(conv.std() * np.sqrt(7 * 7 * 3) / np.sqrt(2) - 1) < 0.2  # He normal
  assert np.all(np.asarray(state["batch_stats"]["backbone"]["bn1"]["var"]) == 1)
  assert np.all(np.asarray(state["params"]["classifier"]["bias"]) == 0)


def _torchvision_key(key: str) -> str:
  """The PyTorch peer's key in torchvision's layout, which our loader reads:
  ``backbone.layers.0.1.conv2.weight`` -> ``layer1.1.conv2.weight``."""
  key = re.sub(r"^backbone\.layers\.(\d+)\.",
               lambda m: f"layer{int(m.group(1)) + 1}.", key)
  return key.removeprefix("backbone.")


def test_torch_model_is_our_model():
  """The benchmarks' PyTorch peer, per head: its state dict loads strictly
  into ours (every tensor's name and shape, nothing missing or left over)
  and, on those weights (BatchNorm statistics randomised), gives our logits."""
  torch_models = pytest.importorskip("benchmarks.torch_models")
  torch = torch_models.torch
  torch.manual_seed(0)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  for head in ("brnpa", "gap"):
    theirs = torch_models.build_classifier(head, (1, 2, 1, 1), 5,
                                           stage_sizes=(1, 1, 1, 1), width=4)
    with torch.no_grad():
      for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
          for t in (m.weight, m.bias, m.running_mean):
            t.uniform_(-0.5, 0.5)
          m.running_var.uniform_(0.5, 2.0)
      want = theirs.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    ours = train_step.build(head, "high", stage_sizes=(1, 1, 1, 1), width=4,
                            num_classes=5)
    shapes = jax.eval_shape(lambda r, m=ours: m.init(r, jax.numpy.zeros((1, 32, 32, 3))),
                            jax.random.key(0))
    sd = {_torchvision_key(k): v.numpy() for k, v in theirs.state_dict().items()}
    variables = weights.load_pretrained(shapes, weights.torch_to_flat(sd))
    got = jax.jit(ours.apply)(variables, images)[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4,
                               err_msg=head)
