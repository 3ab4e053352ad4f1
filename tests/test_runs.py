"""The workdir's owner: config guard, finished runs, damaged checkpoints."""

import hashlib
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

import train
from brnpa_jax import cli
from brnpa_jax.runs import (RESUME_SAFE_FIELDS, Checkpointer, ConfigMismatchError,
                            RunError, Workdir, load_run, restore_variables)
from brnpa_jax.runs.checkpoints import DAMAGED_DIR
from brnpa_jax.runs.workdir import ADDED_FIELDS, config_differences
from brnpa_jax.train.trainer import train_and_evaluate
from configs import default
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _snapshot(root) -> dict[str, str]:
  """Every file under ``root`` with its content's hash."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _train_cli(workdir, tfds_dir, *extra):
  return cli.run(train.define_flags, train.main, prog="train.py", argv=[
      "--config", os.path.join(REPO, "configs/default.py") + ":runlocal",
      f"--config.data.data_dir={tfds_dir}", "--config.mesh.num_devices=1",
      f"--workdir={workdir}", *extra])


def test_config_differences_name_each_field():
  stored = {"optim": {"lr": 0.002, "name": "adamw"}, "model": {"head": "brnpa"},
            "log_every_steps": 20, "mesh": {"num_devices": 0, "fsdp": 1},
            "data": {"image_size": 64}}
  requested = json.loads(json.dumps(stored))
  requested["optim"]["lr"] = 0.1
  requested["model"]["head"] = "gap"
  requested["log_every_steps"] = 5          # resume-safe
  requested["mesh"]["num_devices"] = 8      # resume-safe
  requested["data"]["extra"] = (1, 2)       # a field the stored run lacks
  assert config_differences(stored, requested) == [
      ("data.extra", "<absent>", [1, 2]), ("model.head", "brnpa", "gap"),
      ("optim.lr", 0.002, 0.1)]
  assert {"log_every_steps", "mesh.num_devices"} <= set(RESUME_SAFE_FIELDS)


def test_a_run_from_before_a_field_existed_is_the_same_config():
  """A stored config that lacks a field added since (the run was trained
  under the value that reproduces the old code) equals a config that has it
  at that value, and differs from one that has another value."""
  requested = default.get_config("runlocal")
  stored = json.loads(requested.to_json_best_effort())
  removed = []
  for field in ADDED_FIELDS:
    *parents, leaf = field.split(".")
    node = stored
    for p in parents:
      node = node.get(p, {})
    if leaf in node:
      removed.append(field)
      del node[leaf]
  assert removed and config_differences(stored, requested) == []
  changed = requested.copy_and_resolve_references()
  changed.model.drop_path_rate = 0.1
  assert config_differences(stored, changed) == [
      ("model.drop_path_rate", 0.0, 0.1)]


def test_config_is_written_once_and_changes_are_recorded(tmp_path):
  wd = Workdir(str(tmp_path / "run"))
  config = ml_collections.ConfigDict({"optim": {"lr": 0.002}, "seed": 0})
  assert wd.check_config(config) == []
  wd.write_config(config)
  first = open(wd.config_file).read()
  wd.write_config(ml_collections.ConfigDict({"optim": {"lr": 0.5}, "seed": 0}))
  assert open(wd.config_file).read() == first  # written once
  os.makedirs(os.path.join(wd.checkpoints_dir, "100"))  # the run has trained
  changed = ml_collections.ConfigDict({"optim": {"lr": 0.1}, "seed": 0})
  with pytest.raises(ConfigMismatchError, match=r"optim.lr: stored 0.002, "
                     r"requested 0.1[\s\S]*--allow_config_change") as e:
    wd.check_config(changed)
  assert len(str(e.value).splitlines()) == 3
  changes = wd.check_config(changed, allow_change=True)
  wd.write_config(changed, changes)
  assert wd.read_config().optim.lr == 0.1
  record = json.loads(open(wd.file("config_history.jsonl")).read())
  assert record["changes"] == [{"field": "optim.lr", "stored": 0.002,
                                "requested": 0.1}]
  assert record["previous_config"]["optim"]["lr"] == 0.002
  # A finished run is never changed, not even when asked to.
  with open(wd.summary_file, "w") as f:
    json.dump({}, f)
  with pytest.raises(ConfigMismatchError, match="finished run"):
    wd.check_config(config, allow_change=True)


def test_workdir_that_is_a_file_or_not_a_run(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(RunError, match="is a file"):
    Workdir(str(tmp_path / "file")).check_is_directory()
  with pytest.raises(RunError, match="not a training workdir"):
    load_run(str(tmp_path))


def test_finished_run_rerun(finished_run, tfds_dir, tmp_path, capsys):
  """A changed config is refused (every field named, no file touched); the
  same config prints the summary and touches nothing either."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run.workdir, workdir)
  before = _snapshot(workdir)

  assert _train_cli(workdir, tfds_dir, "--config.optim.lr=0.1",
                    "--config.model.head=gap") == 2
  err = capsys.readouterr().err
  assert "finished run" in err
  assert "optim.lr: stored 0.002, requested 0.1" in err
  assert 'model.head: stored "brnpa", requested "gap"' in err
  assert "Traceback" not in err
  assert _snapshot(workdir) == before

  assert _train_cli(workdir, tfds_dir) == 0
  out = capsys.readouterr().out
  assert "Summary" in out and "test_accuracy" in out
  assert _snapshot(workdir) == before


def test_damaged_newest_checkpoint_falls_back(finished_run, tfds_dir, tmp_path,
                                              capsys):
  """Every file of the newest checkpoint truncated: the rerun warns, resumes
  from the older one and ends with the uninterrupted run's parameters."""
  config = tiny_config(tfds_dir)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 13)
    assert train_and_evaluate(config, str(tmp_path)) == {"stopped_at_step": 13}
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [12, 13]
  for dirpath, _, files in os.walk(tmp_path / "checkpoints" / "13"):
    for name in files:
      path = os.path.join(dirpath, name)
      os.truncate(path, os.path.getsize(path) // 2)
  capsys.readouterr()

  summary = train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "checkpoints/13 does not restore" in out and "using step 12" in out
  assert "test_accuracy" in summary
  assert os.listdir(tmp_path / DAMAGED_DIR) == ["checkpoints_13"]  # kept
  ours, step, _ = restore_variables(str(tmp_path), "latest")
  ref, ref_step, _ = restore_variables(str(finished_run.workdir), "latest")
  assert step == ref_step == 16
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_restorable_checkpoint_names_the_directory(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run.workdir, workdir)
  for dirpath, _, files in os.walk(workdir / "best"):
    for name in files:
      os.truncate(os.path.join(dirpath, name), 0)
  with pytest.raises(RunError, match=r"No checkpoint in .*best restores"):
    restore_variables(str(workdir), "best")
