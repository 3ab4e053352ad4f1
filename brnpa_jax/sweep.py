r"""Hyper-parameter search as the authors ran it (docs/method.md#hyper-parameter-search), with Optuna.

  python -m brnpa_jax.sweep --config configs/cub_brnpa_lowres.py \
      --workdir runs/sweep_cub_lowres --trials 25

Each trial draws the optimiser (sgd, adam, amsgrad), the learning rate (log
[1e-4, 1e-2]), the batch size, dropout ({0, .2, .4, .6}) and weight decay
(log [1e-6, 1e-3]); for a distillation config (``config.task == 'distill'``)
also the temperature ({1, 6, 11, 16, 21}) and alpha ([0.1, 1]). It trains in
``WORKDIR/trial_NNN`` with ``train_and_evaluate`` and scores the best
validation value of the task's selection metric (accuracy for
classification). The study lives in ``WORKDIR/study.journal`` (Optuna's
journal storage): rerunning the command skips finished trials and continues a
trial a crash interrupted from its own checkpoints, until ``--trials`` trials
have completed. ``WORKDIR/best.json`` holds the best trial and the
``--config.*`` overrides that reproduce it. One sweep process per workdir.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import optuna
from absl import flags, logging

from brnpa_jax import cli
from brnpa_jax.config_check import check_search_space
from brnpa_jax.config_file import define_config_flag
from brnpa_jax.errors import ConfigError
from brnpa_jax.train import program, trainer

# Sampled field -> (kind, values): 'choice' (categorical), 'log' (log-uniform
# [lo, hi]) or 'uniform'. Names are config paths.
SPACE = {
    "optim.name": ("choice", ("sgd", "adam", "amsgrad")),
    "optim.lr": ("log", (1e-4, 1e-2)),
    "model.dropout": ("choice", (0.0, 0.2, 0.4, 0.6)),
    "optim.weight_decay": ("log", (1e-6, 1e-3)),
}
DISTILL_SPACE = {
    "distill.temperature": ("choice", (1.0, 6.0, 11.0, 16.0, 21.0)),
    "distill.alpha": ("uniform", (0.1, 1.0)),
}
STUDY_FILE = "study.journal"


def default_batch_sizes(config) -> tuple[int, ...]:
  """Half, one and two times the config's batch size, keeping those the
  devices and micro-batches divide."""
  devices = config.mesh.num_devices or jax.device_count()
  unit = devices * config.get("grad_accum_steps", 1)
  b = config.batch_size
  return tuple(s for s in (b // 2, b, 2 * b) if s >= unit and s % unit == 0) or (b,)


def search_space(config, batch_sizes: Sequence[int]) -> dict[str, tuple]:
  """The fields a trial draws for ``config``."""
  space = dict(SPACE, batch_size=("choice", tuple(int(b) for b in batch_sizes)))
  if config.get("task") == "distill":
    if "distill" not in config:
      raise ConfigError("config.task is 'distill' but there is no config.distill "
                        "section with temperature and alpha.")
    space.update(DISTILL_SPACE)
  return space


def check_space(config, space) -> None:
  """Refuses a search space with a value that gives an invalid config
  (``config_check``) or a batch the devices do not divide, before the study
  is created."""
  check_search_space(config, space, trial_config,
                     flags={"batch_size": "--batch_sizes"})
  for b in space["batch_size"][1]:
    try:
      program.make_layout(trial_config(config, {"batch_size": b}))
    except ConfigError as e:
      raise ConfigError(f"--batch_sizes: {e}") from None


def _suggest(trial, name: str, kind: str, values):
  if kind == "choice":
    return trial.suggest_categorical(name, list(values))
  return trial.suggest_float(name, *values, log=kind == "log")


def trial_config(config, params: dict[str, Any]):
  """A copy of ``config`` with the sampled ``params`` (config path -> value)."""
  c = config.copy_and_resolve_references()
  for path, value in params.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"The sweep sets config.{path}, which the config lacks.")
    old = node[leaf]
    if isinstance(value, float) and isinstance(old, int) and not isinstance(old, bool):
      raise ConfigError(f"config.{path} is the int {old}; write it as a float "
                        f"({float(old)}) so the sweep can set {value}.")
    node[leaf] = float(value) if isinstance(old, float) else value
  return c


def _check_same_space(study, space) -> None:
  """Optuna cannot change a categorical's choices within a study: say so."""
  for t in study.trials:
    for name, dist in t.distributions.items():
      kind, values = space.get(name, (None, None))
      if kind == "choice" and tuple(dist.choices) != tuple(values):
        raise ConfigError(
            f"This study drew {name} from {tuple(dist.choices)}, now "
            f"{tuple(values)}: pass the same choices (--batch_sizes) or use a "
            "new --workdir.")


def _stale_trials(study) -> list:
  """Trials a crash left unfinished, with checkpoints, not yet taken up."""
  State = optuna.trial.TrialState
  retried = {t.user_attrs.get("retry_of") for t in study.trials}
  return [t for t in study.trials
          if t.state in (State.RUNNING, State.FAIL) and t.number not in retried
          and not t.user_attrs.get("diverged")
          and os.path.isdir(os.path.join(t.user_attrs.get("workdir", ""),
                                         "checkpoints"))]


def run_sweep(config, workdir: str, trials: int, *,
              batch_sizes: Sequence[int] | None = None, seed: int = 0):
  """Runs (or resumes) the search until ``trials`` trials have completed.

  Args:
    config: the base config; each trial trains a copy with drawn fields.
    workdir: holds the study, ``trial_NNN/`` run folders and ``best.json``.
    trials: completed trials wanted in total, over all reruns.
    batch_sizes: the batch-size choices (default ``default_batch_sizes``).
    seed: the TPE sampler's seed.

  Returns:
    The Optuna study.
  """
  space = search_space(config, batch_sizes or default_batch_sizes(config))
  check_space(config, space)
  os.makedirs(workdir, exist_ok=True)
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(os.path.join(workdir, STUDY_FILE)))
  study = optuna.create_study(
      study_name="sweep", storage=storage, direction="maximize",
      load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed))
  _check_same_space(study, space)
  stale = _stale_trials(study)
  for t in stale:
    # Mark the crashed trial failed; a new one with its parameters continues
    # training in its folder from the newest checkpoint there.
    if t.state == optuna.trial.TrialState.RUNNING:
      study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(t.params, user_attrs={"workdir": t.user_attrs["workdir"],
                                              "retry_of": t.number})

  def objective(trial):
    params = {name: _suggest(trial, name, *spec) for name, spec in space.items()}
    run_dir = trial.user_attrs.get("workdir") or os.path.join(
        workdir, f"trial_{trial.number:03d}")
    trial.set_user_attr("workdir", run_dir)
    try:
      summary = trainer.train_and_evaluate(trial_config(config, params), run_dir)
    except FloatingPointError:
      trial.set_user_attr("diverged", True)  # not worth continuing on a rerun
      raise
    if "stopped_at_step" in summary:
      raise KeyboardInterrupt(f"Trial {trial.number} stopped at step "
                              f"{summary['stopped_at_step']}; rerun to continue.")
    # The trainer maximises the task's selection metric on the validation
    # split and reports it as best_val_<metric> (accuracy for classification).
    best = [k for k in summary if k.startswith("best_val_")]
    if len(best) != 1:
      raise ValueError(f"No single best_val_* entry in the summary: {sorted(summary)}.")
    return summary[best[0]]

  done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
  if trials > done:
    # A diverging trial (NaN loss) fails and the search goes on.
    study.optimize(objective, n_trials=trials - done, catch=(FloatingPointError,))
  write_best(study, workdir)
  return study


def write_best(study, workdir: str) -> dict[str, Any] | None:
  """Writes ``best.json`` and prints the completed trials, best first."""
  complete = sorted((t for t in study.trials
                     if t.state == optuna.trial.TrialState.COMPLETE),
                    key=lambda t: -t.value)
  if not complete:
    return None
  best = complete[0]
  record = {"trial": best.number, "best_val_accuracy": best.value,
            "params": best.params, "workdir": best.user_attrs.get("workdir"),
            "overrides": " ".join(f"--config.{k}={v}" for k, v in best.params.items())}
  with open(os.path.join(workdir, "best.json"), "w") as f:
    json.dump(record, f, indent=2)
  print(f"{len(complete)} completed trials (best first):")
  for t in complete:
    fields = ", ".join(f"{k}={v:.3g}" if isinstance(v, float)
                       else f"{k}={v}" for k, v in t.params.items())
    print(f"  trial {t.number:3d}  val_accuracy {t.value:.4f}  {fields}")
  print(f"Best: trial {best.number}; retrain with: {record['overrides']}")
  return record


def _define(fv: flags.FlagValues, argv) -> None:
  define_config_flag(fv, argv, "Base config, as for train.py.")
  flags.DEFINE_string("workdir", None, "Holds the study and the trials' runs; "
                      "a rerun resumes.", flag_values=fv)
  flags.DEFINE_integer("trials", 25, "Completed trials wanted in total.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_list("batch_sizes", None, "Batch-size choices (default: half, "
                    "one and two times the config's).", flag_values=fv)
  flags.register_validator(
      "batch_sizes", lambda sizes: all(s.isdigit() and int(s) > 0
                                       for s in sizes or ()),
      "give positive integers, e.g. --batch_sizes=8,16,32.", flag_values=fv)
  flags.DEFINE_integer("sweep_seed", 0, "The sampler's seed.", lower_bound=0,
                       upper_bound=2**32 - 1, flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  logging.set_verbosity(logging.WARNING)  # as train.py: progress, not INFO logs
  batch_sizes = [int(b) for b in fv.batch_sizes or ()] or None
  run_sweep(fv.config, fv.workdir, fv.trials, batch_sizes=batch_sizes,
            seed=fv.sweep_seed)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; see the module docstring."""
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.sweep")


if __name__ == "__main__":
  raise SystemExit(main())
