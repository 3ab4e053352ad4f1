"""The hyper-parameter sweep: real tiny trials, resume without redoing them,
continuation of a crashed trial, the search space."""

import json
import os

import optuna
import pytest

from brnpa_jax import sweep
from helpers import tiny_config as _tiny


def tiny_config(data_dir, arg="runlocal,epochs=1,head=gap,res=low"):
  return _tiny(data_dir, arg, num_overlays=0, **{
      "data.parts.train_size": 64, "data.parts.validation_size": 32,
      "data.parts.test_size": 32})


@pytest.mark.slow
def test_real_trial_then_resume_redoes_nothing(tmp_path, tfds_dir, monkeypatch):
  """One real tiny trial (a real training run costs ~25 s of CPU, mostly
  compilation); reruns then train nothing finished again and add only the
  missing trials."""
  workdir = str(tmp_path / "sweep")
  config = tiny_config(tfds_dir)
  study = sweep.run_sweep(config, workdir, trials=1, batch_sizes=[16, 32])
  (t,) = study.trials
  assert t.state == optuna.trial.TrialState.COMPLETE
  with open(os.path.join(t.user_attrs["workdir"], "summary.json")) as f:
    summary = json.load(f)
  assert t.value == summary["best_val_accuracy"] and 0 <= t.value <= 1
  assert set(t.params) == set(sweep.SPACE) | {"batch_size"}
  assert 1e-4 <= t.params["optim.lr"] <= 1e-2

  trained = []

  def fake_train(cfg, run_dir):
    trained.append(run_dir)
    return {"best_val_accuracy": t.value + 0.5}

  monkeypatch.setattr("brnpa_jax.train.trainer.train_and_evaluate", fake_train)
  assert len(sweep.run_sweep(config, workdir, trials=1,
                             batch_sizes=[16, 32]).trials) == 1
  assert not trained
  study = sweep.run_sweep(config, workdir, trials=2, batch_sizes=[16, 32])
  assert trained == [os.path.join(workdir, "trial_001")]
  assert [x.number for x in study.trials] == [0, 1]
  with open(os.path.join(workdir, "best.json")) as f:
    best = json.load(f)
  assert (best["trial"], best["best_val_accuracy"]) == (1, t.value + 0.5)
  assert "--config.optim.lr=" in best["overrides"]


def test_crashed_trial_continues_in_its_folder(tmp_path, tfds_dir, monkeypatch):
  """A trial left RUNNING with checkpoints (a crash) is taken up again with
  its parameters and folder; the finished count then reaches --trials."""
  workdir = tmp_path / "sweep"
  config = tiny_config(tfds_dir)
  calls = []

  def fake_train(cfg, run_dir):
    calls.append((cfg.optim.name, cfg.optim.lr, cfg.batch_size, run_dir))
    return {"best_val_accuracy": 0.25}

  monkeypatch.setattr("brnpa_jax.train.trainer.train_and_evaluate", fake_train)
  sweep.run_sweep(config, str(workdir), trials=0)  # creates the study only
  storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
      str(workdir / sweep.STUDY_FILE)))
  study = optuna.load_study(study_name="sweep", storage=storage)
  crashed = study.ask()
  crashed.suggest_categorical("optim.name", ["sgd", "adam", "amsgrad"])
  crashed.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
  crashed_dir = str(workdir / "trial_000")
  crashed.set_user_attr("workdir", crashed_dir)
  os.makedirs(os.path.join(crashed_dir, "checkpoints"))
  params = dict(crashed.params)

  study = sweep.run_sweep(config, str(workdir), trials=2, batch_sizes=[32])
  assert calls[0] == (params["optim.name"], params["optim.lr"], 32, crashed_dir)
  assert len(calls) == 2 and calls[1][3] != crashed_dir
  states = [t.state for t in study.trials]
  assert states.count(optuna.trial.TrialState.COMPLETE) == 2
  assert study.trials[0].state == optuna.trial.TrialState.FAIL
  assert study.trials[1].user_attrs["retry_of"] == 0


def test_search_space_and_config_copy(tmp_path):
  config = tiny_config(tmp_path)
  space = sweep.search_space(config, [8, 16])
  assert space["optim.name"] == ("choice", ("sgd", "adam", "amsgrad"))
  assert space["model.dropout"][1] == (0.0, 0.2, 0.4, 0.6)
  assert "distill.temperature" not in space
  c = sweep.trial_config(config, {"optim.name": "sgd", "batch_size": 8,
                                  "model.dropout": 0.4})
  assert (c.optim.name, c.batch_size, c.model.dropout) == ("sgd", 8, 0.4)
  assert config.optim.name == "adamw"  # the base config is untouched
  distill = tiny_config(tmp_path)
  with distill.unlocked():
    distill.task = "distill"
  with pytest.raises(ValueError, match="no config.distill section"):
    sweep.search_space(distill, [8])
  with distill.unlocked():
    distill.distill = dict(temperature=11.0, alpha=0.5)
  space = sweep.search_space(distill, [8])
  assert space["distill.temperature"][1] == (1.0, 6.0, 11.0, 16.0, 21.0)
  assert sweep.trial_config(distill, {"distill.temperature": 6.0}).distill.temperature == 6.0
  with pytest.raises(ValueError, match="lacks"):
    sweep.trial_config(config, {"optim.nope": 1.0})


def test_changed_choices_are_a_clear_error(tmp_path, tfds_dir, monkeypatch):
  monkeypatch.setattr("brnpa_jax.train.trainer.train_and_evaluate",
                      lambda cfg, run_dir: {"best_val_accuracy": 0.5})
  config = tiny_config(tfds_dir)
  sweep.run_sweep(config, str(tmp_path / "s"), trials=1, batch_sizes=[16])
  with pytest.raises(ValueError, match=r"drew batch_size from \(16,\), now \(8, 16\)"):
    sweep.run_sweep(config, str(tmp_path / "s"), trials=2, batch_sizes=[8, 16])
