"""Pure train and eval steps: ``step(state, batch, rng) -> (state, metrics)``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from brnpa_jax.models.classifier import make_infer_fn
from brnpa_jax.train import sharding as shd
from brnpa_jax.train.state import TrainState, create_state, variables


def all_finite(tree) -> jax.Array:
  """Whether every floating-point value of ``tree`` is finite: a scalar
  bool, one reduction per leaf, which XLA fuses with the computation that
  produces the leaf."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.bool_(True)


def make_train_step(model, tx: optax.GradientTransformation, loss_fn: Callable,
                    *, grad_accum_steps: int = 1, micro_batch_sharding=None):
  """Returns ``train_step(state, batch, rng, context=None) -> (state, metrics)``.

  The rng is the run's base key; each step folds in its own step number, so
  dropout (and the random-init ablation) differ per step yet a resumed run
  draws exactly what the uninterrupted one would.

  With ``grad_accum_steps = n > 1`` the batch is cut into n micro-batches
  (example ``i`` goes to micro-batch ``i % n``, so each one keeps examples
  from every device); their gradients are averaged and the optimiser steps
  once. That equals the full-batch step exactly, except that BatchNorm (in
  training mode) normalises each micro-batch by its own statistics and
  updates its running averages n times, as PyTorch's accumulation does; with
  ``model.freeze_bn`` the two are equal.

  Args:
    model: the classifier.
    tx: the optimiser.
    loss_fn: ``(logits, aux, batch, context) -> (loss, metrics)``, a task's
      ``loss_and_metrics``.
    grad_accum_steps: micro-batches per optimiser step.
    micro_batch_sharding: sharding of the stacked (n, B/n, ...) micro-batches
      (the batch axes on axis 1); None leaves the layout to XLA.
  """
  loss_fn_task = loss_fn

  def grads_and_metrics(params, batch_stats, batch, rng, context):
    dropout_rng, brnpa_rng = jax.random.split(rng)

    def loss_fn(params):
      (logits, aux), new_vars = model.apply(
          {"params": params, "batch_stats": batch_stats},
          batch["image"], train=True, mutable=["batch_stats"],
          rngs={"dropout": dropout_rng, "brnpa": brnpa_rng})
      loss, metrics = loss_fn_task(logits, aux, batch, context)
      return loss, (metrics, new_vars["batch_stats"])

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    return grads, metrics, batch_stats

  def accumulate(state, batch, rng, context):
    n = grad_accum_steps
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)
    if micro_batch_sharding is not None:
      micro = jax.lax.with_sharding_constraint(micro, micro_batch_sharding)

    def body(carry, xs):
      grads_sum, batch_stats = carry
      i, mb = xs
      grads, metrics, batch_stats = grads_and_metrics(
          state.params, batch_stats, mb, jax.random.fold_in(rng, i), context)
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads_sum, batch_stats), metrics = jax.lax.scan(
        body, (zeros, state.batch_stats), (jnp.arange(n), micro))
    grads = jax.tree.map(lambda g: g / n, grads_sum)
    return grads, jax.tree.map(jnp.mean, metrics), batch_stats

  def train_step(state: TrainState, batch, rng, context=None):
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps > 1:
      grads, metrics, batch_stats = accumulate(state, batch, rng, context)
    else:
      grads, metrics, batch_stats = grads_and_metrics(
          state.params, state.batch_stats, batch, rng, context)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # A step whose loss, gradients or new state (parameters, batch statistics,
    # optimiser state: a finite gradient times a non-finite learning rate, an
    # overflowing moment) are not finite is not applied: the state keeps its
    # values (the batch counts as seen) and the step is reported. So no
    # checkpoint ever holds a non-finite weight.
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
              & all_finite((params, batch_stats, opt_state)))
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    metrics["grad_norm"] = grad_norm
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state))
    return new_state, metrics

  return train_step


def make_eval_step(model, metrics_fn: Callable):
  """Returns ``eval_step(state, batch) -> sums``.

  ``metrics_fn(logits, aux, batch)`` returns per-batch sums (a task's
  ``eval_metrics``).
  """

  def eval_step(state: TrainState, batch):
    logits, aux = model.apply(variables(state), batch["image"], train=False)
    return metrics_fn(logits, aux, batch)

  return eval_step


def make_forward_fn(model):
  """Returns ``forward(state, images) -> (logits, aux)`` in inference mode."""

  def forward(state: TrainState, images):
    return model.apply(variables(state), images, train=False)

  return forward


def make_predict_fn(model):
  """Returns ``predict(state, images) -> {'probs', 'maps', 'norms'}``."""
  infer = make_infer_fn(model)
  return lambda state, images: infer(variables(state), images)


class JittedSteps(NamedTuple):
  """The jitted functions of a run, with the shardings they were built for."""
  init: Callable            # rng -> state
  train: Callable           # (state, batch, rng[, context]) -> (state, metrics); donates state
  eval: Callable | None     # (state, batch) -> sums
  predict: Callable         # (state, images) -> {'probs', 'maps', 'norms'}
  forward: Callable         # (state, images) -> (logits, aux)
  state_shapes: Any         # ShapeDtypeStructs of the state
  state_sharding: Any       # NamedShardings of the state
  data_sharding: NamedSharding


def jit_steps(model, tx: optax.GradientTransformation, mesh: Mesh,
              image_shape: tuple[int, ...], *, loss_fn: Callable,
              metrics_fn: Callable | None = None, grad_accum_steps: int = 1,
              with_context: bool = False) -> JittedSteps:
  """Jits init, train, eval and predict with explicit shardings on ``mesh``.

  The state's shapes come from ``jax.eval_shape``; the state is created
  directly in its sharding (``out_shardings``) and donated to the train step.

  Args:
    model: the classifier.
    tx: the optimiser.
    mesh: a ``(data, fsdp)`` mesh from ``sharding.make_mesh``.
    image_shape: one input's shape for initialisation, e.g. (1, 64, 64, 3).
    loss_fn: ``(logits, aux, batch, context) -> (loss, metrics)``, a task's
      ``loss_and_metrics``.
    metrics_fn: ``(logits, aux, batch) -> per-batch sums``, a task's
      ``eval_metrics``; None for tasks that evaluate otherwise (retrieval,
      episodes), which then get no ``eval`` step.
    grad_accum_steps: micro-batches per optimiser step.
    with_context: the train step takes a fourth argument, the task's
      ``train_context()`` (replicated).
  """
  init = lambda rng: create_state(model, tx, rng, image_shape)
  state_shapes = jax.eval_shape(init, jax.random.key(0))
  state_sharding = shd.state_shardings(mesh, state_shapes)
  repl, data = shd.replicated(mesh), shd.data_sharding(mesh)
  train = make_train_step(
      model, tx, loss_fn, grad_accum_steps=grad_accum_steps,
      micro_batch_sharding=NamedSharding(mesh, P(None, shd.BATCH_AXES)))
  train_in = (state_sharding, data, repl) + ((repl,) if with_context else ())
  return JittedSteps(
      init=jax.jit(init, out_shardings=state_sharding),
      train=jax.jit(train, in_shardings=train_in,
                    out_shardings=(state_sharding, repl), donate_argnums=0),
      eval=None if metrics_fn is None else jax.jit(
          make_eval_step(model, metrics_fn), in_shardings=(state_sharding, data),
          out_shardings=repl),
      predict=jax.jit(make_predict_fn(model), in_shardings=(state_sharding, data),
                      out_shardings=repl),
      forward=jax.jit(make_forward_fn(model), in_shardings=(state_sharding, data),
                      out_shardings=repl),
      state_shapes=state_shapes, state_sharding=state_sharding,
      data_sharding=data)
