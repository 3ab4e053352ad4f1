"""What a run's config compiles to: its mesh, model, optimiser and jitted steps.

The ``Trainer`` and ahead-of-time compilation for TPU topologies
(``brnpa_jax.train.aot``) both build a run's steps here, so the program
compiled for a topology is the one ``train.py`` runs: the same mesh and
``fsdp`` rules, batch checks, model and dtype, optimiser, task loss, gradient
accumulation and state donation. Nothing here reads data or touches a
workdir: the class count and the steps per epoch (which only shape the
learning-rate schedule) are arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import optax
from jax.sharding import Mesh

from brnpa_jax.runs.restore import image_hw
from brnpa_jax.train import sharding as shd
from brnpa_jax.train.optim import make_optimizer
from brnpa_jax.train.steps import JittedSteps, jit_steps


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a run's batches meet its devices.

  Attributes:
    mesh: the ``(data, fsdp)`` mesh.
    global_batch: ``config.batch_size``, over all devices and micro-batches.
    grad_accum_steps: micro-batches per optimiser step.
    local_batch: this process's (one host's) training batch.
    local_eval_batch: this process's evaluation batch.
  """
  mesh: Mesh
  global_batch: int
  grad_accum_steps: int
  local_batch: int
  local_eval_batch: int


def make_layout(config, devices: Sequence[jax.Device] | None = None) -> Layout:
  """The mesh of ``config.mesh`` and the checked batch sizes.

  Args:
    config: a run's config (``mesh``, ``batch_size``, ``eval_batch_size``,
      ``grad_accum_steps``).
    devices: None: this job's devices (``jax.devices()``, every process's);
      else e.g. a TPU topology's devices, whose host count then divides the
      batches instead of ``jax.process_count()``.

  Raises:
    ConfigError: the mesh or a batch does not divide.
  """
  mesh = shd.make_mesh(config.mesh.num_devices, config.mesh.fsdp, devices)
  hosts = None if devices is None else shd.process_count(mesh)
  accum = config.get("grad_accum_steps", 1)
  return Layout(
      mesh=mesh, global_batch=config.batch_size, grad_accum_steps=accum,
      local_batch=shd.check_batch_size(config.batch_size, mesh,
                                       micro_batches=accum, num_processes=hosts),
      local_eval_batch=shd.check_batch_size(config.eval_batch_size, mesh,
                                            "eval_batch_size",
                                            num_processes=hosts))


@dataclasses.dataclass(frozen=True)
class Program:
  """A run's model, optimiser and jitted steps on its mesh.

  Attributes:
    model: the task's model.
    tx: the optimiser.
    schedule: its learning rate per step.
    steps: the jitted init / train / eval / predict / forward functions and
      the state's shapes and shardings.
    image_hw: the input size.
  """
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  steps: JittedSteps
  image_hw: tuple[int, int]


def build_program(config, task, layout: Layout, *, num_classes: int,
                  steps_per_epoch: int, with_context: bool) -> Program:
  """The model, optimiser and jitted steps of ``config`` for ``task``.

  Args:
    config: the run's config.
    task: its ``brnpa_jax.tasks`` task (model builder, loss, eval metrics).
    layout: from ``make_layout``.
    num_classes: outputs of the classifier.
    steps_per_epoch: optimiser steps per epoch (the schedule's unit).
    with_context: the train step takes the task's ``train_context()`` (e.g.
      a distillation teacher's variables) as a fourth argument.
  """
  model = task.build_model(num_classes)
  tx, schedule = make_optimizer(config.optim, steps_per_epoch, config.num_epochs)
  hw = image_hw(config.data)
  steps = jit_steps(
      model, tx, layout.mesh, (1, *hw, 3), loss_fn=task.loss_and_metrics,
      metrics_fn=getattr(task, "eval_metrics", None),
      grad_accum_steps=layout.grad_accum_steps, with_context=with_context)
  return Program(model=model, tx=tx, schedule=schedule, steps=steps,
                 image_hw=hw)

