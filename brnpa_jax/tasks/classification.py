"""Image classification: the loss and the metrics the trainer reports.

A task is two pure functions over the model's ``(logits, aux)`` and a batch:
``loss_and_metrics`` for training (mean over the batch) and ``eval_metrics``
returning per-batch sums that the trainer adds up over a split and divides by
``count`` (so padded examples, ``batch['mask'] == 0``, count for nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from brnpa_jax.data.normalization import denormalize
from brnpa_jax.tasks.base import RunContext, Task, Visual


def cross_entropy(logits_BxN, labels_B, label_smoothing: float = 0.0):
  """Per-example cross-entropy with optional label smoothing."""
  if label_smoothing:
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels_B, logits_BxN.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits_BxN, targets)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxN, labels_B)


def _correct(logits_BxN, labels_B):
  return (jnp.argmax(logits_BxN, -1) == labels_B).astype(jnp.float32)


def loss_and_metrics(logits_BxN, aux, batch, context=None, *,
                     label_smoothing: float = 0.0):
  """Training loss: cross-entropy, plus one per auxiliary head if present.

  Has the signature of a train step's ``loss_fn`` (``context`` is unused).

  Returns:
    ``(loss, metrics)`` with ``loss``, ``accuracy`` and, for the aux-heads
    ablation, ``aux_<name>_loss`` / ``aux_<name>_accuracy`` (batch means).
  """
  del context
  labels = batch["label"]
  ce = jnp.mean(cross_entropy(logits_BxN, labels, label_smoothing))
  aux_loss, metrics = aux_heads_loss(aux, labels, label_smoothing)
  metrics.update(ce=ce, accuracy=jnp.mean(_correct(logits_BxN, labels)),
                 loss=ce + aux_loss)
  return ce + aux_loss, metrics


def aux_heads_loss(aux, labels_B, label_smoothing: float = 0.0):
  """The auxiliary heads' summed cross-entropies (0 without them) and their
  ``aux_<name>_loss`` / ``aux_<name>_accuracy`` metrics."""
  loss, metrics = 0.0, {}
  for name, aux_logits in aux.get("aux_logits", {}).items():
    aux_ce = jnp.mean(cross_entropy(aux_logits, labels_B, label_smoothing))
    loss = loss + aux_ce
    metrics[f"aux_{name}_loss"] = aux_ce
    metrics[f"aux_{name}_accuracy"] = jnp.mean(_correct(aux_logits, labels_B))
  return loss, metrics


def eval_metrics(logits_BxN, aux, batch):
  """Sums over the real examples of a batch: ``count``, ``loss``, ``correct``."""
  labels = batch["label"]
  mask = batch.get("mask", jnp.ones_like(labels, jnp.float32))
  sums = {
      "count": jnp.sum(mask),
      "loss": jnp.sum(cross_entropy(logits_BxN, labels) * mask),
      "accuracy": jnp.sum(_correct(logits_BxN, labels) * mask),
  }
  for name, aux_logits in aux.get("aux_logits", {}).items():
    sums[f"aux_{name}_accuracy"] = jnp.sum(_correct(aux_logits, labels) * mask)
  return sums


def finalize_eval(sums) -> dict[str, float]:
  """Turns summed eval metrics into means over the real examples."""
  count = max(float(sums["count"]), 1.0)
  return {k: float(v) / count for k, v in sums.items() if k != "count"}


class ClassificationTask(Task):
  """Image classification with cross-entropy; selects on validation accuracy."""

  def loss_and_metrics(self, logits, aux, batch, context):
    del context
    return loss_and_metrics(logits, aux, batch,
                            label_smoothing=self.config.get("label_smoothing", 0.0))

  def eval_metrics(self, logits, aux, batch):
    return eval_metrics(logits, aux, batch)

  def evaluate(self, ctx: RunContext, state, split: str) -> dict[str, float]:
    """Sums ``eval_metrics`` over a split's padded batches; means over real ones."""
    ds = self.eval_dataset(split, batch_size=ctx.local_eval_batch,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    totals = None
    for batch in ds.as_numpy_iterator():
      batch = {k: v for k, v in batch.items() if k in ("image", "label", "mask")}
      sums = ctx.eval_step(state, ctx.to_global(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError(f"Split {split!r} has no examples.")
    return finalize_eval(jax.device_get(totals))

  def visual(self, ctx: RunContext, state, count: int) -> Visual | None:
    """The ranked maps over the first ``count`` images of the last
    evaluation split (the test split by default)."""
    if count <= 0:
      return None
    split = self.eval_splits()[-1]
    ds = self.eval_dataset(split, batch_size=ctx.local_eval_batch,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    batch = next(ds.as_numpy_iterator())
    out = jax.device_get(ctx.predict(
        state, ctx.to_global({"image": batch["image"]})["image"]))
    probs = out["probs"]
    n = min(count, len(batch["label"]))
    titles = [f"label {l} / pred {p} ({q:.0%})" for l, p, q in
              zip(batch["label"][:n], probs[:n].argmax(-1), probs[:n].max(-1))]
    return Visual("ranked_maps", f"{split}_ranked_maps", {
        "images": denormalize(batch["image"][:n]), "maps": out["maps"][:n],
        "norms": out["norms"][:n], "titles": titles})
