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


def cross_entropy(logits_BxN, labels_B, label_smoothing: float = 0.0):
  """Per-example cross-entropy with optional label smoothing."""
  if label_smoothing:
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels_B, logits_BxN.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits_BxN, targets)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxN, labels_B)


def _correct(logits_BxN, labels_B):
  return (jnp.argmax(logits_BxN, -1) == labels_B).astype(jnp.float32)


def loss_and_metrics(logits_BxN, aux, batch, *, label_smoothing: float = 0.0):
  """Training loss: cross-entropy, plus one per auxiliary head if present.

  Returns:
    ``(loss, metrics)`` with ``loss``, ``accuracy`` and, for the aux-heads
    ablation, ``aux_<name>_loss`` / ``aux_<name>_accuracy`` (batch means).
  """
  labels = batch["label"]
  ce = jnp.mean(cross_entropy(logits_BxN, labels, label_smoothing))
  metrics = {"ce": ce, "accuracy": jnp.mean(_correct(logits_BxN, labels))}
  loss = ce
  for name, aux_logits in aux.get("aux_logits", {}).items():
    aux_ce = jnp.mean(cross_entropy(aux_logits, labels, label_smoothing))
    loss = loss + aux_ce
    metrics[f"aux_{name}_loss"] = aux_ce
    metrics[f"aux_{name}_accuracy"] = jnp.mean(_correct(aux_logits, labels))
  metrics["loss"] = loss
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
