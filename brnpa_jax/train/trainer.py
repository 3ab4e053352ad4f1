"""The training loop: config -> data + model -> jitted steps -> metrics/checkpoints.

``train_and_evaluate(config, workdir)`` trains, evaluates on the validation
split every epoch, keeps the best checkpoint by validation accuracy, resumes
from the newest checkpoint in ``workdir`` when there is one, and at the end
evaluates the best state on the test split, writes ``summary.json`` and PNG
overlays of the ranked maps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from brnpa_jax.models.weights import load_into_state
from brnpa_jax.tasks import get_task
from brnpa_jax.train import sharding as shd
from brnpa_jax.train import steps as steps_lib
from brnpa_jax.train.checkpointing import Checkpointer, abstract_like
from brnpa_jax.train.optim import make_optimizer
from brnpa_jax.train.writers import create_writer


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

  Tasks (``brnpa_jax.tasks``) reach the run through ``forward``, ``predict``,
  ``eval_step``, ``to_global``, ``local_eval_batch``, ``model`` and ``mesh``.
  """

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.task = get_task(config)
    self.mesh = shd.make_mesh(config.mesh.num_devices, config.mesh.fsdp)
    self.global_batch = config.batch_size
    self.grad_accum_steps = config.get("grad_accum_steps", 1)
    self.local_batch = shd.check_batch_size(config.batch_size, self.mesh,
                                            micro_batches=self.grad_accum_steps)
    self.local_eval_batch = shd.check_batch_size(config.eval_batch_size, self.mesh,
                                                 "eval_batch_size")
    if jax.process_count() > 1:
      # One process builds a generated dataset; the others then find it.
      if jax.process_index() == 0:
        self.task.prepare_data()
      multihost_utils.sync_global_devices("dataset prepared")
    self.num_classes = self.task.num_classes()
    self.num_train = self.task.num_train_examples()
    self.steps_per_epoch = self.num_train // self.global_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={self.global_batch} is larger than the "
                       f"{self.num_train} training examples.")
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.model = self.task.build_model(self.num_classes)
    self.tx, self.schedule = make_optimizer(config.optim, self.steps_per_epoch,
                                            config.num_epochs)
    self._build_steps()
    self.ckpt = Checkpointer(workdir, max_to_keep=config.get("max_to_keep", 2))

  def _build_steps(self):
    cfg = self.config
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(cfg.seed))
    context = self.task.train_context()
    self._context = () if context is None else (jax.device_put(
        context, shd.replicated(self.mesh)),)
    steps = steps_lib.jit_steps(
        self.model, self.tx, self.mesh, (1, *self._image_hw(), 3),
        task=self.task, grad_accum_steps=self.grad_accum_steps,
        with_context=context is not None)
    self._init, self.train_step = steps.init, steps.train
    self.eval_step, self.predict = steps.eval, steps.predict
    self.forward = steps.forward
    self.state_shapes, self.state_sharding = steps.state_shapes, steps.state_sharding
    self.data_sharding = steps.data_sharding

  def _image_hw(self) -> tuple[int, int]:
    size = self.config.data.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

  def to_global(self, batch):
    """Global arrays, sharded on the data axes, from this process's batch."""
    return shd.to_global(batch, self.data_sharding)

  # -- state -------------------------------------------------------------
  def restore_or_init(self):
    """The newest checkpoint in the workdir, else a fresh state."""
    abstract = abstract_like(self.state_shapes, self.state_sharding)
    state, meta = self.ckpt.restore_latest(abstract)
    if state is None:
      state = self.task.initial_state(self, self._init(self.init_rng))
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
    return self.task.evaluate(self, state, split)

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
            self._log_train(writer, step, pending, bar)
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

  def _log_train(self, writer, step, pending, bar):
    metrics = jax.device_get(pending)
    means = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    if not math.isfinite(means["loss"]):
      raise FloatingPointError(
          f"Training loss is {means['loss']} at step {step}: lower optim.lr "
          f"(now {self.config.optim.lr}) or set optim.grad_clip_norm.")
    means["lr"] = float(self.schedule(step))
    writer.write_scalars(step, {f"train_{k}": v for k, v in means.items()})
    bar.set_postfix({k: f"{means[k]:.3f}" for k in ("loss", "accuracy")
                     if k in means})

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
    overlay = self.task.visualize(self, best, cfg.get("num_overlays", 8))
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
      with open(os.path.join(self.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      width = max(len(k) for k in summary)
      lines = [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float)
               else f"  {k:<{width}}  {v}" for k, v in summary.items()]
      print("\nSummary (" + self.workdir + ")\n" + "\n".join(lines), flush=True)
    return summary

  def close(self):
    self.ckpt.close()


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the configured model in ``workdir``; returns the summary."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    # Read back by tools that restore the run (distillation teachers, predict,
    # export, evaluation) without being told its config.
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  trainer = Trainer(config, workdir)
  try:
    return trainer.train()
  finally:
    trainer.close()
