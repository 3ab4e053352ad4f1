"""The train state: a plain pytree, so it jits, shards and checkpoints as is."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a step updates. The model and optimiser stay outside (static).

  Attributes:
    step: number of optimiser steps taken (int32 scalar).
    params: model parameters (float32).
    batch_stats: BatchNorm running statistics (float32).
    opt_state: optimiser state.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState


def create_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                 image_shape: tuple[int, ...]) -> TrainState:
  """Initialises a state; call under ``jax.jit`` (or ``jax.eval_shape``)."""
  variables = model.init({"params": rng}, jnp.zeros(image_shape, jnp.float32),
                         train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def variables(state: TrainState) -> dict[str, Any]:
  """The ``model.apply`` variables of a state."""
  return {"params": state.params, "batch_stats": state.batch_stats}
