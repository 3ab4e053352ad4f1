"""The task interface: what a problem adds to the shared trainer.

The trainer (loop, jitted sharded steps, checkpoints, best-model selection,
early stopping, resume) is the same for every task; a ``Task`` supplies the
data, the model, the loss (pure, traced into the train step) and the
evaluation (host side). ``config.task`` names one in ``brnpa_jax.tasks.TASKS``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax.models import build_model


def _pipeline():
  # Imported on use: TensorFlow is a dependency of the data path only, so the
  # pure parts (losses, steps, benchmarks) import without it.
  from brnpa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline


class Task:
  """Base task: reads ``config.data`` through ``input_pipeline``.

  Subclasses override what differs. Attributes:
    selection_metric: the key of ``evaluate``'s result that selects the best
      model on the validation split (higher is better).
  """

  selection_metric = "accuracy"

  def __init__(self, config):
    self.config = config

  # -- data (host side) ------------------------------------------------------
  def prepare_data(self) -> None:
    """Makes the data ready (a generated dataset builds itself). Multi-process
    runs call it on process 0 first, then on the others."""
    _pipeline().get_builder(self.config.data)

  def num_classes(self) -> int:
    return _pipeline().num_classes(self.config.data)

  def num_train_examples(self) -> int:
    data = self.config.data
    return _pipeline().num_examples(data, data.train_split)

  def train_dataset(self, *, batch_size: int, seed: int, epoch: int,
                    process_index: int, process_count: int):
    """One epoch of this process's batches, deterministic from (seed, epoch)."""
    return _pipeline().make_train_dataset(
        self.config.data, batch_size=batch_size, seed=seed, epoch=epoch,
        process_index=process_index, process_count=process_count)

  def eval_dataset(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int):
    """The split in order, last batch padded, with a ``mask`` of real examples."""
    return _pipeline().make_eval_dataset(
        self.config.data, split, batch_size=batch_size,
        process_index=process_index, process_count=process_count)

  def eval_splits(self) -> list[str]:
    """First: validation (model selection); all: evaluated on the best state."""
    return list(self.config.data.eval_splits)

  # -- model -------------------------------------------------------------------
  def build_model(self, num_classes: int):
    return build_model(self.config.model, num_classes, self.config.dtype)

  def initial_state(self, trainer, state):
    """The state a fresh run starts from (not called when resuming): e.g.
    episodic fine-tuning starts from a pretraining run's weights."""
    del trainer
    return state

  # -- inside the jitted train step (pure) -------------------------------------
  def train_context(self) -> Any:
    """Extra arrays the train step receives (replicated), e.g. a teacher."""
    return None

  def loss_and_metrics(self, logits, aux, batch, context):
    """``(loss, metrics)``; metrics are scalars and include ``loss``."""
    raise NotImplementedError

  def eval_metrics(self, logits, aux, batch):
    """Per-batch sums for the default ``evaluate`` (``count`` included)."""
    raise NotImplementedError

  def finalize_eval(self, sums) -> dict[str, float]:
    count = max(float(sums["count"]), 1.0)
    return {k: float(v) / count for k, v in sums.items() if k != "count"}

  # -- evaluation (host side) --------------------------------------------------
  def evaluate(self, trainer, state, split: str) -> dict[str, float]:
    """Sums ``eval_metrics`` over a split's padded batches; means over real ones."""
    ds = self.eval_dataset(split, batch_size=trainer.local_eval_batch,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    totals = None
    for batch in ds.as_numpy_iterator():
      batch = {k: v for k, v in batch.items() if k in self.eval_keys}
      sums = trainer.eval_step(state, trainer.to_global(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError(f"Split {split!r} has no examples.")
    return self.finalize_eval(jax.device_get(totals))

  eval_keys = ("image", "label", "mask")

  def visualize(self, trainer, state, count: int) -> str | None:
    """Writes a picture of the best state's maps; returns its path or None."""
    del trainer, state, count
    return None


def forward_batches(trainer, state, images_NxHxWx3: np.ndarray,
                    keys=("embedding",)) -> dict[str, np.ndarray]:
  """Runs ``trainer.forward`` over host images in padded fixed-size batches.

  Returns the requested ``aux`` entries (and ``logits``) for the N images,
  concatenated on the host. Single-process helper for retrieval and episodes.
  """
  n, bs = len(images_NxHxWx3), trainer.local_eval_batch
  out: dict[str, list] = {}
  for start in range(0, n, bs):
    chunk = images_NxHxWx3[start:start + bs]
    real = len(chunk)
    if real < bs:
      pad = np.zeros((bs - real,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    logits, aux = trainer.forward(state, trainer.to_global({"image": chunk})["image"])
    got = dict({k: aux[k] for k in keys}, logits=logits)
    for k, v in jax.device_get(got).items():
      out.setdefault(k, []).append(np.asarray(v)[:real])
  return {k: np.concatenate(v) for k, v in out.items()}
