"""Compiling a run's steps for a TPU pod slice on a machine without one.

With the ``libtpu`` wheel (the ``tpu`` extra), JAX builds the devices of a
TPU topology (``jax.experimental.topologies``) and XLA's TPU compiler
compiles for them ahead of time: ``jax.jit(step).lower(abstract inputs)
.compile()``. The program is the one ``train.py`` runs
(``train/program.py``: mesh and ``fsdp`` rules, batch checks, model, dtype,
optimiser, task loss, gradient accumulation, donated state); only the data
and the workdir are left out: the class count comes from the config (or is
given), the inputs are ``ShapeDtypeStruct``s carrying their shardings, and a
distillation teacher is its variables' shapes.

The compiled executable's ``memory_analysis()`` and ``cost_analysis()``
describe one device (one chip; one TensorCore on v4). What they do not
model: collectives' time (two slice sizes of one generation give the same
per-device estimate), the input pipeline, and host-device transfers; the
compiler's own ``optimal_seconds`` scores some ops at -1 s and is not used.
The time printed is a roofline bound, ``max(flops / peak, bytes / HBM
bandwidth)`` with the chip figures of ``chips.py``: no step runs faster, and
real steps run slower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies

from brnpa_jax.errors import UserError
from brnpa_jax.models import build_model
from brnpa_jax.runs import Workdir, abstract_like
from brnpa_jax.runs.restore import image_hw
from brnpa_jax.tasks.classification import ClassificationTask
from brnpa_jax.tasks.distill import DistillationTask
from brnpa_jax.train import chips as chips_lib
from brnpa_jax.train import program as program_lib
from brnpa_jax.train import sharding as shd

LIBTPU_MISSING = (
    "libtpu is not installed: compiling for TPU topologies needs the `tpu` "
    "extra: pip install -r requirements-tpu.txt -c constraints.txt (or pip "
    "install '.[tpu]').")

# Classes of the datasets a config can name (the classifier's size).
NUM_CLASSES = {"caltech_birds2011": 200, "cars196": 196, "stanford_dogs": 120,
               "oxford_flowers102": 102, "oxford_iiit_pet": 37}

STEP_KINDS = ("train", "eval", "predict")


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _captured_stderr():
  """Holds back what C++ writes to stderr (libtpu's start-up warnings about
  the missing TPU VM environment) and yields a function returning it."""
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def topology(name: str):
  """``(chip, compiler name, devices)`` of a TPU topology, e.g. ``v5e:4x4``
  or the slice name ``v5e-16``.

  Raises:
    UserError: libtpu is missing, or the name is not accepted (the message
      lists the accepted names).
  """
  try:
    chip, topo = chips_lib.parse_topology(name)
  except ValueError as e:
    raise UserError(str(e)) from None
  if not libtpu_installed():
    raise UserError(LIBTPU_MISSING)
  with _captured_stderr() as log:
    try:
      devices, err = topologies.get_topology_desc(
          topology_name=topo, platform="tpu").devices, None
    except Exception as e:  # pylint: disable=broad-except  # libtpu's own errors
      err, text = e, log()
  if err is not None:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "lock" in (msg + text).lower():
      raise UserError(
          "libtpu is in use by another process (one process at a time); "
          "wait for it, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1.") from err
    raise UserError(f"libtpu cannot build topology {topo!r} ({msg[:200]});\n"
                    f"use {chips_lib.accepted_names()}.") from err
  return chip, topo, list(devices)


def num_classes_of(config, given: int | None = None) -> int:
  """The classifier's size: ``given``, else the dataset's known class count."""
  if given:
    return given
  data = config.data
  if data.name == "parts":
    return int(data.parts.num_classes)
  if data.name in NUM_CLASSES:
    return NUM_CLASSES[data.name]
  raise UserError(f"the class count of data.name={data.name!r} is not known "
                  "without reading the data: pass --num_classes.")


def abstract_teacher(config, num_classes: int):
  """``(model, variable shapes, config, source)`` of a distillation teacher.

  The teacher's ``config.json`` when its workdir has one; else the student's
  model at ``res=low`` (the paper's pairing). Only shapes are built: no
  checkpoint is read.
  """
  wd = Workdir(config.distill.teacher_workdir)
  if wd.has_config():
    tcfg, source = wd.read_config(), wd.config_file
  else:
    tcfg = ml_collections.ConfigDict(config.to_dict())
    tcfg.model.res = "low"
    source = "the student's model at res=low (no config.json in " \
             f"{config.distill.teacher_workdir!r})"
  model = build_model(tcfg.model, num_classes, config.dtype)
  hw = image_hw(tcfg.data)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *hw, 3)), train=False))
  variables = {"params": shapes["params"],
               "batch_stats": shapes.get("batch_stats", {})}
  return model, variables, tcfg, source


def compile_task(config, num_classes: int):
  """``(task, note)``: the config's task, built without its data."""
  name = config.get("task", "classification")
  if name == "classification":
    return ClassificationTask(config), ""
  if name == "distill":
    model, variables, tcfg, source = abstract_teacher(config, num_classes)
    return (DistillationTask(config, teacher=(model, variables, tcfg)),
            f"teacher: {tcfg.model.backbone} {tcfg.model.head} "
            f"res={tcfg.model.res}, from {source}")
  raise UserError(f"task={name!r}: ahead-of-time compilation covers the "
                  "classification and distill tasks.")


@dataclasses.dataclass
class StepReport:
  """One compiled step on one device of a topology.

  Memory fields are bytes per device from ``memory_analysis()``; ``total``
  is arguments + outputs - aliased (donated) + temporaries + code. Costs are
  per device per step from ``cost_analysis()``.
  """
  kind: str
  topology: str
  devices: int
  hosts: int
  dtype: str
  fsdp: int
  grad_accum_steps: int
  global_batch: int
  batch_per_device: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int
  state_bytes: int           # params, batch stats, optimiser state (from shardings)
  hbm_bytes: float
  hbm_share: float
  flops: float
  bytes_accessed: float
  compute_seconds: float     # flops / peak
  memory_seconds: float      # bytes accessed / HBM bandwidth
  roofline_seconds: float    # max of the two: a lower bound on the step time
  images_per_second_device: float  # upper bounds
  images_per_second_slice: float
  compile_seconds: float
  rematerialised: bool = False  # XLA recomputes activations to fit the HBM
  note: str = ""

  @property
  def flops_per_image(self) -> float:
    return self.flops / max(self.batch_per_device, 1e-9)


class DoesNotFit(Exception):
  """The compiler ran out of device memory; the message is its own."""


def _device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return ("RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text
          or "out of memory" in text.lower())


def _batch_shapes(n: int, hw: tuple[int, int], *, eval_batch: bool):
  s = jax.ShapeDtypeStruct
  batch = {"image": s((n, *hw, 3), jnp.float32), "label": s((n,), jnp.int32)}
  if eval_batch:
    batch["mask"] = s((n,), jnp.float32)
  return batch


def compile_steps(config, devices, chip: chips_lib.Chip, topology_name: str, *,
                  num_classes: int, kinds=STEP_KINDS,
                  on_report: Callable[[StepReport], Any] | None = None
                  ) -> list[StepReport]:
  """Compiles the config's steps for ``devices`` and analyses each one.

  Args:
    config: a run's config (its ``mesh``, batches, model, dtype, optimiser).
    devices: the topology's devices (``topology(name)[2]``).
    chip: their figures.
    topology_name: for the reports.
    num_classes: the classifier's size.
    kinds: any of ``train``, ``eval``, ``predict``.
    on_report: called with each report as soon as it is ready.

  Raises:
    ConfigError: the mesh or a batch does not divide (as ``train.py`` says).
    DoesNotFit: a step does not fit the device's memory.
  """
  layout = program_lib.make_layout(config, devices)
  task, note = compile_task(config, num_classes)
  context = task.train_context()
  program = program_lib.build_program(
      config, task, layout, num_classes=num_classes,
      steps_per_epoch=100,  # shapes the schedule's values only, not the program
      with_context=context is not None)
  steps, mesh = program.steps, layout.mesh
  repl = shd.replicated(mesh)
  state = abstract_like(steps.state_shapes, steps.state_sharding)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype,
                             sharding=repl)
  extra = () if context is None else (jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), context),)
  hw = program.image_hw
  train_batch = shd.abstract_global(
      _batch_shapes(layout.global_batch, hw, eval_batch=False), steps.data_sharding)
  eval_batch = shd.abstract_global(
      _batch_shapes(config.eval_batch_size, hw, eval_batch=True),
      steps.data_sharding)
  calls = {
      "train": (steps.train, (state, train_batch, rng, *extra),
                layout.global_batch),
      "eval": (steps.eval, (state, eval_batch), config.eval_batch_size),
      "predict": (steps.predict, (state, eval_batch["image"]),
                  config.eval_batch_size),
  }
  precision = jax.config.jax_default_matmul_precision
  peak = chips_lib.peak_flops(chip, config.dtype, precision)
  hosts = shd.process_count(mesh)
  reports = []
  for kind in kinds:
    fn, args, global_batch = calls[kind]
    if fn is None:
      continue  # a task without eval metrics
    t0 = time.perf_counter()
    try:
      compiled = fn.lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e):
        raise DoesNotFit(str(e).strip().splitlines()[0][:400]) from None
      raise
    seconds = time.perf_counter() - t0
    mem, cost = compiled.memory_analysis(), _cost(compiled)
    # XLA's rematerialisation pass names the instructions it clones *.remat.
    remat = ".remat" in compiled.as_text()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes + mem.temp_size_in_bytes
             + mem.generated_code_size_in_bytes)
    flops, accessed = cost.get("flops", math.nan), cost.get("bytes accessed", math.nan)
    per_device = global_batch / mesh.size
    compute_s, memory_s = flops / peak, accessed / chip.hbm_bandwidth
    roof = max(compute_s, memory_s)
    report = StepReport(
        kind=kind, topology=topology_name, devices=mesh.size, hosts=hosts,
        dtype=config.dtype, fsdp=config.mesh.fsdp,
        grad_accum_steps=layout.grad_accum_steps if kind == "train" else 1,
        global_batch=global_batch, batch_per_device=per_device,
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes, total_bytes=total,
        state_bytes=_device_bytes(state), hbm_bytes=chip.hbm_bytes,
        hbm_share=total / chip.hbm_bytes, flops=flops, bytes_accessed=accessed,
        compute_seconds=compute_s, memory_seconds=memory_s,
        roofline_seconds=roof,
        images_per_second_device=per_device / roof if roof > 0 else math.nan,
        images_per_second_slice=global_batch / roof if roof > 0 else math.nan,
        compile_seconds=seconds, rematerialised=remat,
        note=note if kind == "train" else "")
    reports.append(report)
    if on_report is not None:
      on_report(report)
  return reports
