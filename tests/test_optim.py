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


# Non-default hyper-parameters, so that a name mapped to the wrong optax
# optimiser or a setting left at its default changes the updates.
HYPER = dict(lr=0.05, momentum=0.8, nesterov=True, b1=0.7, b2=0.9,
             weight_decay=0.1, grad_clip_norm=2.0)
# Three steps whose gradients grow, then shrink: AMSGrad's maximum of the
# second moments then differs from Adam's running value.
GRADS = [np.array(x, np.float32) for x in (
    [3.0, -2.0, 0.5], [-1.0, 0.4, 2.0], [0.1, 0.1, -0.05])]


def _reference(name):
  """What ``make_optimizer`` documents for each name, built from optax."""
  h = HYPER
  decay = optax.add_decayed_weights(h["weight_decay"])  # PyTorch's weight_decay
  inner = {
      "sgd": lambda: optax.chain(decay, optax.sgd(h["lr"], h["momentum"],
                                                  nesterov=True)),
      "adam": lambda: optax.chain(decay, optax.adam(h["lr"], h["b1"], h["b2"])),
      "amsgrad": lambda: optax.chain(decay, optax.amsgrad(h["lr"], h["b1"], h["b2"])),
      # Decoupled: scaled by the learning rate, as torch.optim.AdamW.
      "adamw": lambda: optax.adamw(h["lr"], h["b1"], h["b2"],
                                   weight_decay=h["weight_decay"]),
  }[name]()
  return optax.chain(optax.clip_by_global_norm(h["grad_clip_norm"]), inner)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "amsgrad"])
def test_each_name_is_its_optax_optimizer(name):
  tx, _ = make_optimizer(_optim(name=name, **HYPER), 10, 1)
  ref = _reference(name)
  params = ref_params = {"w": np.array([1.0, -0.5, 2.0], np.float32)}
  state, ref_state = tx.init(params), ref.init(ref_params)
  for g in GRADS:
    updates, state = tx.update({"w": g}, state, params)
    ref_updates, ref_state = ref.update({"w": g}, ref_state, ref_params)
    np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-6)
    params = optax.apply_updates(params, updates)
    ref_params = optax.apply_updates(ref_params, ref_updates)


def test_sgd_step_is_pytorchs():
  """By hand, torch.optim.SGD's rule: the first step moves by lr times the
  clipped gradient plus weight_decay times the parameters (the momentum
  buffer starts at that sum; Nesterov adds it once more times momentum)."""
  tx, _ = make_optimizer(_optim(name="sgd", **HYPER), 10, 1)
  p = np.array([1.0, -0.5, 2.0], np.float32)
  g = GRADS[0] * min(1.0, 2.0 / np.linalg.norm(GRADS[0]))  # clipped to norm 2
  d = g + 0.1 * p
  updates, _ = tx.update({"w": GRADS[0]}, tx.init({"w": p}), {"w": p})
  np.testing.assert_allclose(updates["w"], -0.05 * (d + 0.8 * d), rtol=1e-6)


def test_unknown_optimizer_is_error():
  with pytest.raises(ValueError, match="valid"):
    make_optimizer(_optim(name="lamb"), 10, 1)
