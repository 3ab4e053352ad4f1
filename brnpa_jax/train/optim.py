"""Optimisers and learning-rate schedules from the ``optim`` config section."""

from __future__ import annotations

import optax

from brnpa_jax.choices import OPTIMIZERS, SCHEDULES


def make_schedule(optim_cfg, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
  """Learning rate per step.

  ``step`` multiplies the rate by ``step_gamma`` every ``step_every_epochs``
  epochs (the release: x0.9 every 2 epochs); ``cosine`` decays to zero over
  the run. Both may start with ``warmup_epochs`` of linear warm-up.
  """
  if optim_cfg.schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule {optim_cfg.schedule!r}; valid: {SCHEDULES}.")
  lr = optim_cfg.lr
  warmup = int(round(optim_cfg.get("warmup_epochs", 0) * steps_per_epoch))
  total = max(num_epochs * steps_per_epoch, warmup + 1)
  if optim_cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif optim_cfg.schedule == "step":
    main = optax.exponential_decay(
        lr, transition_steps=optim_cfg.step_every_epochs * steps_per_epoch,
        decay_rate=optim_cfg.step_gamma, staircase=True)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps=total - warmup)
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def make_optimizer(optim_cfg, steps_per_epoch: int, num_epochs: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum, Adam, AdamW or AMSGrad.

  For ``sgd``, ``adam`` and ``amsgrad`` weight decay is added to the gradient
  before the optimiser (PyTorch's ``weight_decay``), so hyper-parameters from
  the release carry over unchanged; ``adamw`` decouples it (scaled by the
  learning rate, as ``torch.optim.AdamW``).

  Returns:
    ``(transformation, schedule)``.
  """
  if optim_cfg.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optim_cfg.name!r}; valid: {OPTIMIZERS}.")
  schedule = make_schedule(optim_cfg, steps_per_epoch, num_epochs)
  parts = []
  if optim_cfg.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  if optim_cfg.weight_decay and optim_cfg.name != "adamw":
    parts.append(optax.add_decayed_weights(optim_cfg.weight_decay))
  if optim_cfg.name == "sgd":
    parts.append(optax.sgd(schedule, momentum=optim_cfg.momentum or None,
                           nesterov=optim_cfg.get("nesterov", False)))
  elif optim_cfg.name == "adamw":
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                             weight_decay=optim_cfg.weight_decay))
  elif optim_cfg.name == "adam":
    parts.append(optax.adam(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2))
  else:
    parts.append(optax.amsgrad(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2))
  return optax.chain(*parts), schedule
