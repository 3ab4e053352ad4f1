"""The training loop: config -> data + model -> jitted steps -> metrics/checkpoints.

``train_and_evaluate(config, workdir)`` trains, evaluates on the validation
split every epoch, keeps the best checkpoint by validation accuracy, resumes
from the newest checkpoint in ``workdir`` when there is one, and at the end
evaluates the best state on the test split and writes ``summary.json`` (and,
given a ``draw`` function, a picture of the ranked maps). The workdir's
layout and its config guard belong to ``brnpa_jax.runs``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from brnpa_jax.errors import ConfigError, UserError
from brnpa_jax.models.weights import load_into_state
from brnpa_jax.runs import Checkpointer, Workdir, abstract_like
from brnpa_jax.tasks import get_task
from brnpa_jax.tasks.base import RunContext, Visual
from brnpa_jax.train import program as program_lib
from brnpa_jax.train import sharding as shd
from brnpa_jax.train.writers import create_writer

# Training steps with a non-finite loss, gradient or update (not applied)
# that a run tolerates before it stops (config.max_nonfinite_steps).
MAX_NONFINITE_STEPS = 10


class NonFiniteError(FloatingPointError, UserError):
  """Training kept producing non-finite losses, gradients or updates."""


# Draws a task's end-of-run picture into a PNG path; returns the path
# (``brnpa_jax.explain.figures.draw``; train.py passes it).
DrawFn = Callable[[Visual, str], str]


def _say(msg: str, *args) -> None:
  """Progress for the person watching (process 0), also sent to the log."""
  logging.info(msg, *args)
  if jax.process_index() == 0:
    tqdm.write(msg % args if args else msg)


class _StopRequest:
  """Turns SIGTERM (preemption, ``kill``) and a first Ctrl-C into a
  checkpoint-and-exit at the end of the current step; a second Ctrl-C
  interrupts at once."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    try:
      self._old = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    except ValueError:  # not the main thread: rely on orbax's preemption check
      self._old = {}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      tqdm.write("Interrupted: saving a checkpoint after this step (Ctrl-C "
                 "again to stop at once).")
    self.requested = True

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)


class Trainer:
  """Holds what one run needs: task, model, mesh, jitted steps, checkpoints.

  Constructing it validates the config and the data and writes nothing;
  ``train`` creates the checkpoints. Tasks (``brnpa_jax.tasks``) reach the
  run only through ``context``.
  """

  def __init__(self, config, workdir: str, draw: DrawFn | None = None):
    self.config = config
    self.workdir = Workdir(workdir).path
    self.draw = draw
    self.task = get_task(config)
    self.layout = program_lib.make_layout(config)
    self.mesh = self.layout.mesh
    self.global_batch = config.batch_size
    self.grad_accum_steps = self.layout.grad_accum_steps
    self.local_batch = self.layout.local_batch
    self.local_eval_batch = self.layout.local_eval_batch
    if jax.process_count() > 1:
      # One process builds a generated dataset; the others then find it.
      if jax.process_index() == 0:
        self.task.prepare_data()
      multihost_utils.sync_global_devices("dataset prepared")
    self.num_classes = self.task.num_classes()
    if self.num_classes < 2:
      raise ConfigError(
          f"The training data has {self.num_classes} class: a classifier needs "
          "at least two (an image folder needs one sub-folder per class).")
    self.num_train = self.task.num_train_examples()
    self.steps_per_epoch = self.num_train // self.global_batch
    if self.steps_per_epoch == 0:
      raise ConfigError(
          f"batch_size={self.global_batch} is larger than the {self.num_train} "
          "training examples: lower it with --config.batch_size (or the "
          "config's batch= switch), or add data.")
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self._build_steps()
    self.context = RunContext(
        forward=self.forward, predict=self.predict, eval_step=self.eval_step,
        to_global=self.to_global, local_eval_batch=self.local_eval_batch,
        workdir=Workdir(self.workdir))
    self._ckpt: Checkpointer | None = None  # created on first use

  def _build_steps(self):
    cfg = self.config
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(cfg.seed))
    context = self.task.train_context()
    self._context = () if context is None else (jax.device_put(
        context, shd.replicated(self.mesh)),)
    # The same program ahead-of-time compilation builds (train/program.py).
    program = program_lib.build_program(
        cfg, self.task, self.layout, num_classes=self.num_classes,
        steps_per_epoch=self.steps_per_epoch, with_context=context is not None)
    self.model, self.tx, self.schedule = program.model, program.tx, program.schedule
    steps = program.steps
    self._init, self.train_step = steps.init, steps.train
    self.eval_step, self.predict = steps.eval, steps.predict
    self.forward = steps.forward
    self.state_shapes, self.state_sharding = steps.state_shapes, steps.state_sharding
    self.data_sharding = steps.data_sharding

  def to_global(self, batch):
    """Global arrays, sharded on the data axes, from this process's batch."""
    return shd.to_global(batch, self.data_sharding)

  # -- state -------------------------------------------------------------
  @property
  def ckpt(self) -> Checkpointer:
    """The run's checkpoints (creates ``checkpoints/`` and ``best/``)."""
    if self._ckpt is None:
      self._ckpt = Checkpointer(self.workdir,
                                max_to_keep=self.config.get("max_to_keep", 2))
    return self._ckpt

  def restore_or_init(self):
    """The newest checkpoint in the workdir, else a fresh state."""
    abstract = abstract_like(self.state_shapes, self.state_sharding)
    state, meta = self.ckpt.restore_latest(abstract)
    if state is None:
      state = self.task.initial_state(self._init(self.init_rng))
      if self.config.get("init_from"):  # a fresh run only: resuming never reloads
        state = load_into_state(state, self.config.init_from, self.state_sharding)
        _say("Backbone loaded from %s (classifier skipped).", self.config.init_from)
      return state, {"best_val": -math.inf, "best_step": 0, "best_epoch": 0,
                     "epoch": 0}
    _say("Resumed from step %d in %s.", int(state.step), self.workdir)
    return state, meta

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state_shapes.params))

  # -- evaluation ----------------------------------------------------------
  def evaluate(self, state, split: str) -> dict[str, float]:
    return self.task.evaluate(self.context, state, split)

  # -- training -------------------------------------------------------------
  def train(self) -> dict[str, Any]:
    cfg = self.config
    writer = create_writer(self.workdir)
    state, meta = self.restore_or_init()
    start_step = int(jax.device_get(state.step))
    if start_step == 0:
      writer.write_hparams({k: v for k, v in cfg.to_dict().items()
                            if not isinstance(v, dict)})
    _say("%d parameters, %d steps/epoch, %d epochs, global batch %d on %d "
                 "devices.", self.num_params(), self.steps_per_epoch,
                 cfg.num_epochs, self.global_batch, self.mesh.size)
    t_start = time.time()
    seen_images, train_seconds = 0, 0.0
    if meta.get("epoch", 0) < start_step // self.steps_per_epoch:
      # Resumed from a checkpoint taken at an epoch's last step but before its
      # evaluation (a preemption then): evaluate it first.
      meta = self._end_epoch(writer, state, meta,
                             start_step // self.steps_per_epoch)
    with _StopRequest() as stop:
      step = start_step
      for epoch in range(start_step // self.steps_per_epoch, cfg.num_epochs):
        skip = step - epoch * self.steps_per_epoch
        if self._should_stop_early(meta, epoch):
          break
        ds = self.task.train_dataset(
            batch_size=self.local_batch, seed=cfg.seed, epoch=epoch,
            process_index=jax.process_index(), process_count=jax.process_count())
        bar = tqdm(total=self.steps_per_epoch, initial=skip, unit="step",
                   desc=f"epoch {epoch + 1}/{cfg.num_epochs}", leave=True,
                   disable=jax.process_index() > 0, mininterval=2.0,
                   dynamic_ncols=True)
        pending, t_epoch = [], time.time()
        for batch in tfds.as_numpy(ds.take(self.steps_per_epoch).skip(skip)):
          state, metrics = self.train_step(
              state, self.to_global(batch), self.train_rng, *self._context)
          step += 1
          pending.append(metrics)
          bar.update(1)
          if step % cfg.log_every_steps == 0 or step % self.steps_per_epoch == 0:
            meta = self._log_train(writer, step, pending, bar, meta)
            pending = []
          if stop.requested or self.ckpt.reached_preemption(step):
            self.ckpt.save(step, state, meta, force=True)
            self.ckpt.wait_until_finished()
            bar.close()
            _say("Stopped at step %d; checkpoint saved. Run the same "
                            "command again to resume.", step)
            writer.close()
            return {"stopped_at_step": step}
          if (step % cfg.checkpoint_every_steps == 0
              and step % self.steps_per_epoch):  # epoch ends save after eval
            self.ckpt.save(step, state, meta)
        bar.close()
        jax.block_until_ready(state)
        epoch_time = time.time() - t_epoch
        train_seconds += epoch_time
        seen_images += (self.steps_per_epoch - skip) * self.global_batch
        writer.write_scalars(step, {"epoch_seconds": epoch_time})
        meta = self._end_epoch(writer, state, meta, epoch + 1)
    self.ckpt.wait_until_finished()
    summary = self._summarise(meta, time.time() - t_start, seen_images,
                              train_seconds)
    writer.close()
    return summary

  def _should_stop_early(self, meta, epoch: int) -> bool:
    """True once ``early_stopping_patience`` epochs passed without a new best."""
    patience = self.config.get("early_stopping_patience", 0)
    if patience and epoch > 0 and epoch - meta.get("best_epoch", 0) >= patience:
      _say("Early stopping: no better validation %s for %d epochs (best %.4f "
           "at epoch %d).", self.task.selection_metric, patience,
           meta["best_val"], meta["best_epoch"])
      return True
    return False

  def _end_epoch(self, writer, state, meta, epoch: int):
    """Validation, best-model selection and the epoch's checkpoint."""
    step = int(jax.device_get(state.step))
    val = self.evaluate(state, self.task.eval_splits()[0])
    name = self.task.selection_metric
    if name not in val:
      raise KeyError(f"The task's evaluation returned {sorted(val)}; it has no "
                     f"selection metric {name!r}.")
    is_best = val[name] > meta["best_val"]
    if is_best:
      meta = dict(meta, best_val=val[name], best_step=step, best_epoch=epoch)
    meta = dict(meta, epoch=epoch)
    writer.write_scalars(step, {f"val_{k}": v for k, v in val.items()})
    writer.flush()
    _say("epoch %d: val %s %.4f (best %.4f at step %d)", epoch, name,
         val[name], meta["best_val"], meta["best_step"])
    self.ckpt.save(step, state, meta, best=is_best)
    return meta

  def _log_train(self, writer, step, pending, bar, meta):
    """Writes the mean training metrics since the last log; counts the steps
    that were not applied because their loss or gradients were not finite."""
    metrics = jax.device_get(pending)
    first = step - len(metrics) + 1
    bad = [first + i for i, m in enumerate(metrics) if m["nonfinite"] > 0]
    if bad:
      meta = dict(meta, nonfinite_steps=meta.get("nonfinite_steps", 0) + len(bad))
      _say("Steps %s had a non-finite loss, gradient or update and were not "
           "applied (%d so far).", bad, meta["nonfinite_steps"])
      limit = self.config.get("max_nonfinite_steps", MAX_NONFINITE_STEPS)
      if meta["nonfinite_steps"] > limit:
        raise NonFiniteError(
            f"{meta['nonfinite_steps']} training steps (last: step {bad[-1]}) "
            "had a non-finite loss, gradient or update, more than "
            f"max_nonfinite_steps={limit}; lr was "
            f"{float(self.schedule(bad[-1])):.3g}. Lower "
            "--config.optim.lr, set --config.optim.grad_clip_norm, or use "
            "dtype=float32; the last checkpoint holds finite weights.")
    finite = [m for m in metrics if not m["nonfinite"]]
    means = {k: float(np.mean([m[k] for m in finite])) for k in metrics[0]
             if k != "nonfinite"} if finite else {}
    means["nonfinite"] = float(len(bad))
    means["lr"] = float(self.schedule(step))
    writer.write_scalars(step, {f"train_{k}": v for k, v in means.items()})
    bar.set_postfix({k: f"{means[k]:.3f}" for k in ("loss", "accuracy")
                     if k in means})
    return meta

  def _summarise(self, meta, wall_seconds, seen_images, train_seconds):
    """Test accuracy of the best state, overlays, and ``summary.json``."""
    cfg = self.config
    abstract = abstract_like(self.state_shapes, self.state_sharding)
    best, best_meta = self.ckpt.restore_best(abstract)
    if best is None:
      raise RuntimeError(f"No best checkpoint in {self.workdir}/best: the run "
                         "ended before its first evaluation.")
    splits = self.task.eval_splits()
    results = {split: self.evaluate(best, split) for split in splits}
    overlay = None
    visual = self.task.visual(self.context, best, cfg.get("num_overlays", 8))
    if visual is not None and self.draw is not None:
      overlay = os.path.join(self.context.workdir.overlays_dir, visual.name + ".png")
      if jax.process_index() == 0:
        self.draw(visual, overlay)
    m = cfg.model
    summary = {
        "task": cfg.get("task", "classification"),
        "model": f"{m.backbone} {m.head} res={m.res}"
                 + (f" K={m.num_maps}" if m.head != "gap" else ""),
        "params": self.num_params(),
        "best_step": best_meta["best_step"],
        f"best_val_{self.task.selection_metric}": best_meta["best_val"],
        **{f"{split}_{k}": v for split, r in results.items() for k, v in r.items()},
        "wall_seconds": wall_seconds,
        "train_images_per_second": seen_images / max(train_seconds, 1e-9),
        "overlays": overlay,
    }
    if jax.process_index() == 0:
      self.context.workdir.write_summary(summary)
      print_summary(self.workdir, summary)
    return summary

  def close(self):
    if self._ckpt is not None:
      self._ckpt.close()


def print_summary(workdir: str, summary: dict[str, Any]) -> None:
  """The summary table the run prints at its end (process 0)."""
  if jax.process_index() > 0:
    return
  width = max(len(k) for k in summary)
  lines = [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float)
           else f"  {k:<{width}}  {v}" for k, v in summary.items()]
  print("\nSummary (" + workdir + ")\n" + "\n".join(lines), flush=True)


def train_and_evaluate(config, workdir: str, *, draw: DrawFn | None = None,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the configured model in ``workdir``; returns the summary.

  A finished run (its ``summary.json`` exists) is not trained again: its
  summary is printed and returned, and nothing in the workdir changes. A run
  is resumed only under the config it was started with (fields in
  ``runs.RESUME_SAFE_FIELDS`` aside); ``allow_config_change`` resumes an
  unfinished run under a changed config and records the change. A workdir
  whose run saved no checkpoint (a start that failed) takes the new config,
  recorded the same way.

  Args:
    config: the run's config.
    workdir: where it writes; created once the config and data check out.
    draw: draws the task's end-of-run picture (``explain.figures.draw``);
      None: no picture.
    allow_config_change: see above.

  Raises:
    brnpa_jax.runs.RunError: the workdir cannot be used with this config.
  """
  wd = Workdir(workdir)
  wd.check_is_directory()
  changes = wd.check_config(config, allow_change=allow_config_change)
  if wd.is_finished():
    summary = wd.read_summary()
    print_summary(wd.path, summary)
    return summary
  trainer = Trainer(config, wd.path, draw=draw)
  # Process 0 holds the workdir while the run lives; the others follow it.
  held = wd.lock() if jax.process_index() == 0 else contextlib.nullcontext()
  try:
    with held:
      if jax.process_index() == 0:
        wd.check_config(config, allow_change=allow_config_change)  # now held
        # Read back by everything that restores the run (runs.load_run).
        wd.write_config(config, changes)
        wd.write_class_names(trainer.task.class_names())
      if changes:
        _say("%s %s under a changed config (%s); recorded in "
             "config_history.jsonl.",
             "Resuming" if wd.has_checkpoints() else "Starting", wd.path,
             ", ".join(c[0] for c in changes))
      return trainer.train()
  finally:
    trainer.close()
