"""Pure train and eval steps: ``step(state, batch, rng) -> (state, metrics)``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from brnpa_jax.tasks import classification
from brnpa_jax.train.state import TrainState, variables


def make_train_step(model, tx: optax.GradientTransformation, *,
                    label_smoothing: float = 0.0):
  """Returns ``train_step(state, batch, rng) -> (state, metrics)``.

  The rng is the run's base key; each step folds in its own step number, so
  dropout (and the random-init ablation) differ per step yet a resumed run
  draws exactly what the uninterrupted one would.
  """
  loss_fn_task = functools.partial(classification.loss_and_metrics,
                                   label_smoothing=label_smoothing)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    dropout_rng, brnpa_rng = jax.random.split(rng)

    def loss_fn(params):
      (logits, aux), new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats},
          batch["image"], train=True, mutable=["batch_stats"],
          rngs={"dropout": dropout_rng, "brnpa": brnpa_rng})
      loss, metrics = loss_fn_task(logits, aux, batch)
      return loss, (metrics, new_vars["batch_stats"])

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model):
  """Returns ``eval_step(state, batch) -> sums`` (see ``classification``)."""

  def eval_step(state: TrainState, batch):
    logits, aux = model.apply(variables(state), batch["image"], train=False)
    return classification.eval_metrics(logits, aux, batch)

  return eval_step


def make_predict_fn(model):
  """Returns ``predict(state, images) -> (probs, aux)`` for visualisation."""

  def predict(state: TrainState, images):
    logits, aux = model.apply(variables(state), images, train=False)
    return jax.nn.softmax(logits), {k: v for k, v in aux.items()
                                    if k in ("maps", "norms", "indices")}

  return predict
