"""End-to-end: the trainer on a tiny config, checkpoints, resume, outputs."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from brnpa_jax.runs import Checkpointer, restore_variables
from brnpa_jax.tasks.classification import ClassificationTask
from brnpa_jax.train.trainer import NonFiniteError, Trainer, train_and_evaluate
from helpers import FAST_PRNG, tiny_config

pytestmark = pytest.mark.slow  # trains or compiles end to end



def test_run_writes_checkpoints_metrics_overlays(finished_run):
  workdir, summary = finished_run.workdir, finished_run.summary
  assert os.listdir(workdir / "checkpoints") and os.listdir(workdir / "best")
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_rows = [r for r in rows if "train_loss" in r]
  val_rows = [r for r in rows if "val_accuracy" in r]
  assert [r["step"] for r in val_rows] == [8, 16]  # one per epoch
  assert [r["step"] for r in train_rows] == [4, 8, 12, 16]  # every 4 steps
  assert all(np.isfinite(r["train_loss"]) for r in train_rows)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert os.path.getsize(summary["overlays"]) > 1000
  saved = json.load(open(workdir / "summary.json"))
  assert 0.0 <= saved["test_accuracy"] <= 1.0
  assert saved["best_val_accuracy"] == max(r["val_accuracy"] for r in val_rows)


def test_resume_equals_uninterrupted(tmp_path, tfds_dir, finished_run):
  """Preempted mid-epoch, then rerun: the same parameters as one straight run."""
  ref_dir = finished_run.workdir
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 5)
    stopped = train_and_evaluate(tiny_config(tfds_dir), str(tmp_path))
  assert stopped == {"stopped_at_step": 5}
  train_and_evaluate(tiny_config(tfds_dir), str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "val_accuracy" in r] == [8, 16]
  ref, ref_step, _ = restore_variables(str(ref_dir), "latest")
  ours, step, _ = restore_variables(str(tmp_path), "latest")
  assert step == ref_step == 16  # 2 epochs of 8 steps
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):  # params, BN
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_devices_is_clear_error(tfds_dir, tmp_path):
  cfg = tiny_config(tfds_dir, **{"mesh.num_devices": 8, "batch_size": 12})
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    Trainer(cfg, str(tmp_path))


def _nan_batches(steps):
  """Wraps ClassificationTask.train_dataset: the images of the given
  (0-based, per epoch) batches become NaN."""
  original = ClassificationTask.train_dataset
  bad = tf.constant(sorted(steps), tf.int64)

  def train_dataset(self, **kw):
    def poison(i, batch):
      hit = tf.reduce_any(tf.equal(i, bad))
      image = tf.where(hit, tf.fill(tf.shape(batch["image"]), float("nan")),
                       batch["image"])
      return dict(batch, image=image)
    return original(self, **kw).enumerate().map(poison)

  return train_dataset


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tfds_dir, tmp_path,
                                                              capsys,
                                                              finished_run):
  """The session run's config (2 epochs of 8 steps): its programs are compiled
  already. Batches 2 and 5 of each epoch are NaN: steps 3, 6, 11 and 14."""
  del finished_run  # compiles the steps (and the persistent cache holds them)
  cfg = lambda n: tiny_config(tfds_dir, num_overlays=0, log_every_steps=2,
                              max_nonfinite_steps=n)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ClassificationTask, "train_dataset", _nan_batches({2, 5}))
    summary = train_and_evaluate(cfg(4), str(tmp_path / "tolerated"))
    assert "test_accuracy" in summary
    rows = [json.loads(l) for l in open(tmp_path / "tolerated" / "metrics.jsonl")]
    assert sum(r.get("train_nonfinite", 0) for r in rows) == 4
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(2, 17, 2))
    assert all(np.isfinite(r["train_loss"]) for r in train_rows)
    out = capsys.readouterr().out
    assert "Steps [3] had a non-finite loss" in out
    assert "Steps [14] had a non-finite loss" in out
    params, _, _ = restore_variables(str(tmp_path / "tolerated"), "best")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

    with pytest.raises(NonFiniteError, match=r"2 training steps \(last: step 6\)"
                       r"[\s\S]*lr was[\s\S]*--config.optim.lr"):
      train_and_evaluate(cfg(1), str(tmp_path / "stopped"))
  state, step, _ = restore_variables(str(tmp_path / "stopped"), "latest")
  assert step <= 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def _check_finished(workdir, summary, model):
  """One epoch of 8 steps, logged every 4: returns the training rows."""
  assert summary["model"].startswith(model), summary["model"]
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_rows = [r for r in rows if "train_loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8]
  assert all(np.isfinite(r["train_loss"]) for r in train_rows)
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert os.listdir(workdir / "best")
  return train_rows


@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory, tfds_dir):
  """One epoch of the tiny ViT at low resolution (runlocal keeps the family)."""
  workdir = tmp_path_factory.mktemp("vit_low")
  cfg = tiny_config(tfds_dir, "runlocal,backbone=vit_small_patch16_224,res=low,"
                    "epochs=1", num_overlays=0)
  assert cfg.model.backbone == "vit_test"
  with jax.default_prng_impl(FAST_PRNG):
    return workdir, train_and_evaluate(cfg, str(workdir))


def test_convnext_trains_end_to_end(tmp_path, tfds_dir):
  cfg = tiny_config(tfds_dir, "runlocal,backbone=convnext_tiny,epochs=1",
                    num_overlays=0)
  assert cfg.model.backbone == "convnext_test"
  with jax.default_prng_impl(FAST_PRNG):
    summary = train_and_evaluate(cfg, str(tmp_path))
  _check_finished(tmp_path, summary, "convnext_test brnpa res=high")


def test_vit_trains_and_distils_into_a_high_res_student(tmp_path, tfds_dir,
                                                        vit_teacher):
  """The low-resolution ViT run, then a student with overlapping patches
  (res=high) distilled from it."""
  teacher_dir, summary = vit_teacher
  _check_finished(teacher_dir, summary, "vit_test brnpa res=low")
  cfg = tiny_config(tfds_dir, "runlocal,backbone=vit_test,epochs=1",
                    num_overlays=0, task="distill")
  cfg.unlock()
  cfg.distill = ml_collections.ConfigDict(dict(
      teacher_workdir=str(teacher_dir), temperature=6.0, alpha=0.5))
  cfg.lock()
  with jax.default_prng_impl(FAST_PRNG):
    summary = train_and_evaluate(cfg, str(tmp_path))
  rows = _check_finished(tmp_path, summary, "vit_test brnpa res=high")
  assert all(r["train_kl"] >= 0 for r in rows)  # every training row distils
