"""Optimisers and learning-rate schedules built from a config's optim section."""

import ml_collections
import numpy as np
import optax
import pytest

from brnpa_jax.train.optim import make_optimizer, make_schedule


def _optim(**kw):
  base = dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
              weight_decay=0.0, schedule="constant", warmup_epochs=0.0,
              step_every_epochs=2, step_gamma=0.9, grad_clip_norm=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_schedules():
  step = make_schedule(_optim(schedule="step"), steps_per_epoch=10, num_epochs=10)
  np.testing.assert_allclose([step(0), step(19), step(20), step(45)],
                             [0.1, 0.1, 0.09, 0.081], rtol=1e-6)
  cos = make_schedule(_optim(schedule="cosine", warmup_epochs=1), 10, 10)
  np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(100)],
                             [0.0, 0.05, 0.1, 0.0], atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "amsgrad"])
def test_optimizers_descend(name):
  tx, _ = make_optimizer(_optim(name=name, lr=0.05, weight_decay=1e-4), 10, 1)
  params = {"w": np.array([3.0, -2.0])}
  state = tx.init(params)
  loss = lambda p: float(np.sum(p["w"] ** 2))
  start = loss(params)
  for _ in range(20):
    grads = {"w": 2 * params["w"]}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.8 * start


def test_unknown_optimizer_is_error():
  with pytest.raises(ValueError, match="valid"):
    make_optimizer(_optim(name="lamb"), 10, 1)
