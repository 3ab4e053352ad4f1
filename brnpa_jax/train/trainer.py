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
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from brnpa_jax.data import input_pipeline
from brnpa_jax.data.transforms import denormalize
from brnpa_jax.explain.overlay import save_overlay_grid
from brnpa_jax.models import build_model
from brnpa_jax.models.weights import load_into_state
from brnpa_jax.tasks import classification
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
  """Holds what one run needs: model, mesh, jitted steps, checkpoints."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.mesh = shd.make_mesh(config.mesh.num_devices, config.mesh.fsdp)
    self.global_batch = config.batch_size
    self.grad_accum_steps = config.get("grad_accum_steps", 1)
    self.local_batch = shd.check_batch_size(config.batch_size, self.mesh,
                                            micro_batches=self.grad_accum_steps)
    self.local_eval_batch = shd.check_batch_size(config.eval_batch_size, self.mesh,
                                                 "eval_batch_size")
    data = config.data
    if jax.process_count() > 1:
      # One process builds a generated dataset; the others then find it.
      if jax.process_index() == 0:
        input_pipeline.get_builder(data)
      multihost_utils.sync_global_devices("dataset prepared")
    self.num_classes = input_pipeline.num_classes(data)
    self.num_train = input_pipeline.num_examples(data, data.train_split)
    self.steps_per_epoch = self.num_train // self.global_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={self.global_batch} is larger than the "
                       f"{self.num_train} training examples.")
    self.total_steps = self.steps_per_epoch * config.num_epochs
    self.model = build_model(config.model, self.num_classes, config.dtype)
    self.tx, self.schedule = make_optimizer(config.optim, self.steps_per_epoch,
                                            config.num_epochs)
    self._build_steps()
    self.ckpt = Checkpointer(workdir, max_to_keep=config.get("max_to_keep", 2))

  def _build_steps(self):
    cfg = self.config
    size = cfg.data.image_size
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(cfg.seed))
    steps = steps_lib.jit_steps(
        self.model, self.tx, self.mesh, (1, size, size, 3),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        grad_accum_steps=self.grad_accum_steps)
    self._init, self.train_step = steps.init, steps.train
    self.eval_step, self.predict = steps.eval, steps.predict
    self.state_shapes, self.state_sharding = steps.state_shapes, steps.state_sharding
    self.data_sharding = steps.data_sharding

  # -- state -------------------------------------------------------------
  def restore_or_init(self):
    """The newest checkpoint in the workdir, else a fresh state."""
    abstract = abstract_like(self.state_shapes, self.state_sharding)
    state, meta = self.ckpt.restore_latest(abstract)
    if state is None:
      state = self._init(self.init_rng)
      if self.config.get("init_from"):  # a fresh run only: resuming never reloads
        state = load_into_state(state, self.config.init_from, self.state_sharding)
        _say("Backbone loaded from %s (classifier skipped).", self.config.init_from)
      return state, {"best_val_accuracy": -1.0, "best_step": 0, "epoch": 0}
    _say("Resumed from step %d in %s.", int(state.step), self.workdir)
    return state, meta

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state_shapes.params))

  # -- evaluation ----------------------------------------------------------
  def evaluate(self, state, split: str) -> dict[str, float]:
    ds = input_pipeline.make_eval_dataset(
        self.config.data, split, batch_size=self.local_eval_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    totals = None
    for batch in tfds.as_numpy(ds):
      batch = {k: v for k, v in batch.items() if k in ("image", "label", "mask")}
      sums = self.eval_step(state, shd.to_global(batch, self.data_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return classification.finalize_eval(jax.device_get(totals))

  def write_overlays(self, state, split: str, count: int) -> str | None:
    """PNG grid of the ranked maps over the first ``count`` images of a split."""
    if count <= 0:
      return None
    ds = input_pipeline.make_eval_dataset(
        self.config.data, split, batch_size=self.local_eval_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(iter(tfds.as_numpy(ds)))
    probs, aux = self.predict(state, shd.to_global(
        {"image": batch["image"]}, self.data_sharding)["image"])
    probs, aux = jax.device_get((probs, aux))
    n = min(count, len(batch["label"]))
    titles = [f"label {l} / pred {p} ({q:.0%})" for l, p, q in
              zip(batch["label"][:n], probs[:n].argmax(-1), probs[:n].max(-1))]
    path = os.path.join(self.workdir, "overlays", f"{split}_ranked_maps.png")
    if jax.process_index() == 0:
      save_overlay_grid(path, denormalize(batch["image"][:n]), aux["maps"][:n],
                        aux["norms"][:n], titles)
    return path

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
        ds = input_pipeline.make_train_dataset(
            cfg.data, batch_size=self.local_batch, seed=cfg.seed, epoch=epoch,
            process_index=jax.process_index(), process_count=jax.process_count())
        bar = tqdm(total=self.steps_per_epoch, initial=skip, unit="step",
                   desc=f"epoch {epoch + 1}/{cfg.num_epochs}", leave=True,
                   disable=jax.process_index() > 0, mininterval=2.0,
                   dynamic_ncols=True)
        pending, t_epoch = [], time.time()
        for batch in tfds.as_numpy(ds.take(self.steps_per_epoch).skip(skip)):
          state, metrics = self.train_step(
              state, shd.to_global(batch, self.data_sharding), self.train_rng)
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

  def _end_epoch(self, writer, state, meta, epoch: int):
    """Validation, best-model selection and the epoch's checkpoint."""
    step = int(jax.device_get(state.step))
    val = self.evaluate(state, self.config.data.eval_splits[0])
    is_best = val["accuracy"] > meta["best_val_accuracy"]
    if is_best:
      meta = {"best_val_accuracy": val["accuracy"], "best_step": step}
    meta = dict(meta, epoch=epoch)
    writer.write_scalars(step, {f"val_{k}": v for k, v in val.items()})
    writer.flush()
    _say("epoch %d: val accuracy %.4f (best %.4f at step %d)", epoch,
                 val["accuracy"], meta["best_val_accuracy"], meta["best_step"])
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
    bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}")

  def _summarise(self, meta, wall_seconds, seen_images, train_seconds):
    """Test accuracy of the best state, overlays, and ``summary.json``."""
    cfg = self.config
    abstract = abstract_like(self.state_shapes, self.state_sharding)
    best, best_meta = self.ckpt.restore_best(abstract)
    if best is None:
      raise RuntimeError(f"No best checkpoint in {self.workdir}/best: the run "
                         "ended before its first evaluation.")
    results = {split: self.evaluate(best, split) for split in cfg.data.eval_splits}
    overlay = self.write_overlays(best, cfg.data.eval_splits[-1],
                                  cfg.get("num_overlays", 8))
    m = cfg.model
    summary = {
        "model": f"{m.backbone} {m.head} res={m.res}"
                 + (f" K={m.num_maps}" if m.head != "gap" else ""),
        "params": self.num_params(),
        "best_step": best_meta["best_step"],
        "best_val_accuracy": best_meta["best_val_accuracy"],
        **{f"{split}_accuracy": r["accuracy"] for split, r in results.items()},
        **{f"{split}_{k}": v for split, r in results.items() for k, v in r.items()
           if k.startswith("aux_")},
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
  trainer = Trainer(config, workdir)
  try:
    return trainer.train()
  finally:
    trainer.close()
