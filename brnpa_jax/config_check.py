"""The validation pass: every config field that has a valid range, checked
once, before a tool writes anything.

``validate(config)`` raises one ``ConfigError`` that names the first bad
field, its value, the valid values and the flag that fixes it (and how many
other fields are bad); ``problems(config)`` lists them all. Every tool's
``--config`` flag runs it once the overrides are applied
(``config_file.define_config_flag``), so a run never starts, and no workdir
or output is created, under a config that cannot work. Fields a config lacks
are not checked (a task reads only its own sections); the fields every run
reads (``REQUIRED``) must be there.

What is checked without data or devices: sizes and counts, finite learning
rates and decays, probabilities, names (task, dtype, optimiser, schedule,
backbone, head, resolution, dataset, splits), divisibility (batch by
gradient-accumulation steps, episodes, re-id P x K), and ``num_maps``
against the feature grid that the backbone's strides give the image size
(``models.registry.feature_grid``, no tracing). What needs the data or the
devices (class counts, examples, the mesh) is checked where those are read,
still before the workdir is written.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Iterable

from brnpa_jax.choices import (FEWSHOT_METRICS, FEWSHOT_PHASES, OPTIMIZERS,
                               SCHEDULES, TASKS)
from brnpa_jax.data import catalog, image_files, parts
from brnpa_jax.data import fewshot as fewshot_data
from brnpa_jax.data import reid as reid_data
from brnpa_jax.errors import ConfigError
from brnpa_jax.models import BACKBONES, HEADS
from brnpa_jax.models.registry import (DTYPES, STEMS, backbone_kwargs, family,
                                       feature_grid)


# Fields the trainer reads from every config, and those a task, optimiser
# or schedule adds.
REQUIRED = (
    "seed", "dtype", "mesh.num_devices", "mesh.fsdp", "batch_size",
    "eval_batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps",
    "model.backbone", "model.head", "model.res", "model.num_maps",
    "model.refine", "model.init", "model.aux_heads", "model.dropout",
    "model.use_bias", "data.name", "data.image_size", "optim.name", "optim.lr",
    "optim.weight_decay", "optim.schedule")
REQUIRED_BY = {
    "distill": ("distill.teacher_workdir", "distill.temperature",
                "distill.alpha"),
    "fewshot": tuple(f"fewshot.{f}" for f in (
        "phase", "pretrain_workdir", "train_ways", "train_shots",
        "train_queries", "episodes_per_epoch", "metric", "eval_ways",
        "eval_shots", "eval_queries", "eval_episodes", "select_shots")),
    "reid": ("data.height", "data.width", "data.ids_per_batch",
             "data.images_per_id", "reid.triplet_margin", "reid.eval_block_size",
             "reid.num_retrieved"),
    "sgd": ("optim.momentum",), "adam": ("optim.b1", "optim.b2"),
    "adamw": ("optim.b1", "optim.b2"), "amsgrad": ("optim.b1", "optim.b2"),
    "step": ("optim.step_every_epochs", "optim.step_gamma"),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """A field's valid values: ``text`` says them, ``ok`` tests one."""
  text: str
  ok: Callable[[Any], bool]


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return (isinstance(v, numbers.Real) and not isinstance(v, bool)
          and math.isfinite(v))


# Sizes, counts and seeds end up in int32 arrays and C longs: a larger value
# (--config.model.width=2**63) cannot work, and failed deep inside JAX.
INT_MAX = 2**31 - 1


def _is_size(v, lo: int = 1) -> bool:
  return _is_int(v) and lo <= v <= INT_MAX


def _ints(lo: int) -> Rule:
  return Rule(f"integers >= {lo} (below 2**31)", lambda v: _is_size(v, lo))


def _reals(lo: float, hi: float = math.inf, *, lo_open: bool = False,
           hi_open: bool = False) -> Rule:
  """Finite numbers in the interval; ``[lo, hi)`` etc. by the open ends."""
  text = (f"finite numbers in {'(' if lo_open else '['}{lo:g}, {hi:g}"
          f"{')' if hi_open or hi == math.inf else ']'}")
  return Rule(text, lambda v: _is_real(v)
              and (lo < v if lo_open else lo <= v)
              and (v < hi if hi_open else v <= hi))


def _one_of(choices: Iterable) -> Rule:
  choices = tuple(choices)
  return Rule(f"one of {list(choices)}", lambda v: v in choices)


def _sizes(v) -> bool:  # an int side or an (H, W) pair
  pair = v if isinstance(v, (tuple, list)) else (v,)
  return len(pair) in (1, 2) and all(_is_size(s) for s in pair)


def _hw(size) -> tuple[int, int]:
  pair = tuple(size) if isinstance(size, (tuple, list)) else (size,)
  return pair[0], pair[-1]


POSITIVE, COUNT, PROBABILITY = _ints(1), _ints(0), _reals(0, 1, hi_open=True)
FIELDS = {
    "task": _one_of(TASKS), "dtype": _one_of(DTYPES), "seed": COUNT,
    "mesh.num_devices": COUNT, "mesh.fsdp": POSITIVE,
    "batch_size": POSITIVE, "eval_batch_size": POSITIVE,
    "grad_accum_steps": POSITIVE, "num_epochs": POSITIVE,
    "early_stopping_patience": COUNT, "max_nonfinite_steps": COUNT,
    "log_every_steps": POSITIVE, "checkpoint_every_steps": POSITIVE,
    "max_to_keep": POSITIVE, "num_overlays": COUNT,
    "label_smoothing": PROBABILITY,
    "model.backbone": _one_of(BACKBONES), "model.head": _one_of(HEADS),
    "model.init": _one_of(("norm", "random")), "model.num_maps": POSITIVE,
    "model.width": COUNT, "model.dropout": PROBABILITY,
    # The small-image variants (0: the preset's; docs/backbones.md).
    "model.patch_size": COUNT, "model.img_size": COUNT,
    "model.drop_path_rate": PROBABILITY, "model.stem": _one_of(STEMS),
    "data.image_size": Rule("integers >= 1, or an (H, W) pair of them", _sizes),
    "data.resize_ratio": _reals(0, 1, lo_open=True),
    "data.resize": _one_of(catalog.RESIZE_MODES),
    "data.process_split": _one_of(catalog.PROCESS_SPLITS),
    "data.brightness": _reals(0), "data.saturation": _reals(0),
    "data.shuffle_buffer": POSITIVE,
    "data.folder.validation_percent": _reals(0, 100, hi_open=True),
    "data.folder.on_corrupt": _one_of(image_files.ON_CORRUPT),
    "data.folder.max_pixels": POSITIVE,
    "optim.name": _one_of(OPTIMIZERS), "optim.schedule": _one_of(SCHEDULES),
    "optim.lr": _reals(0, lo_open=True), "optim.weight_decay": _reals(0),
    "optim.momentum": PROBABILITY, "optim.b1": PROBABILITY,
    "optim.b2": PROBABILITY, "optim.warmup_epochs": _reals(0),
    "optim.step_every_epochs": _reals(0, lo_open=True),
    "optim.step_gamma": _reals(0, 1, lo_open=True),
    "optim.grad_clip_norm": _reals(0),
    "distill.temperature": _reals(0, lo_open=True), "distill.alpha": _reals(0, 1),
    "fewshot.phase": _one_of(FEWSHOT_PHASES),
    "fewshot.metric": _one_of(FEWSHOT_METRICS),
    "fewshot.train_ways": POSITIVE, "fewshot.train_shots": POSITIVE,
    "fewshot.train_queries": POSITIVE, "fewshot.episodes_per_epoch": POSITIVE,
    "fewshot.cosine_scale": _reals(0, lo_open=True),
    "fewshot.eval_ways": POSITIVE, "fewshot.eval_queries": POSITIVE,
    "fewshot.eval_episodes": POSITIVE, "fewshot.eval_seed": COUNT,
    "fewshot.eval_episode_batch": POSITIVE, "fewshot.select_shots": POSITIVE,
    "fewshot.eval_shots": Rule(
        "a non-empty tuple of integers >= 1",
        lambda v: isinstance(v, (tuple, list)) and len(v) > 0
        and all(_is_size(s) for s in v)),
    "data.height": POSITIVE, "data.width": POSITIVE,
    "data.ids_per_batch": POSITIVE, "data.images_per_id": _ints(2),
    "data.erasing_p": _reals(0, 1),
    "data.erasing_fill": _one_of(("mean", "random")),
    "data.pad": COUNT, "data.num_threads": POSITIVE, "data.val_identities": COUNT,
    "reid.triplet_margin": _reals(0), "reid.triplet_weight": _reals(0),
    "reid.eval_block_size": POSITIVE, "reid.num_retrieved": POSITIVE,
    **{f"data.parts.{s}_size": POSITIVE for s in ("train", "validation", "test")},
    "data.parts.num_classes": _ints(2), "data.parts.parts_per_class": POSITIVE,
    "data.parts.num_shared": COUNT, "data.parts.num_clutter": COUNT,
    "data.parts.num_decoys": COUNT, "data.parts.seed": COUNT,
    "data.parts.noise": _reals(0), "data.parts.texture": _reals(0),
    "data.parts.margin": _reals(0, 0.5, hi_open=True),
    "data.parts.image_size": Rule("None (data.image_size) or integers >= 1",
                                  lambda v: v is None or _is_size(v)),
    **{f"data.parts.{f}": Rule("(min, max) fractions, 0 < min <= max < 1",
                               lambda v: isinstance(v, (tuple, list))
                               and len(v) == 2 and all(map(_is_real, v))
                               and 0 < v[0] <= v[1] < 1)
       for f in ("glyph_size", "object_size")},
}
DATASETS = {"classification": catalog.DATASETS, "distill": catalog.DATASETS,
            "fewshot": (*fewshot_data.TFDS_DATASETS, "folder"),
            "reid": tuple(reid_data.NAME_PATTERNS)}

_MISSING = object()


def _get(config, path: str):
  node = config
  for key in path.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


@dataclasses.dataclass(frozen=True)
class Problem:
  """A bad field: its dotted path, its value and what is wrong with it."""
  path: str
  value: Any  # _MISSING: the config lacks the field
  reason: str


def _model_problems(config, get) -> Iterable[Problem]:
  m = config.model
  resolutions = family(m.backbone).resolutions
  if m.res not in resolutions:
    yield Problem("model.res", m.res, f"{m.backbone} has resolutions "
                  f"{sorted(resolutions)}")
    return
  if m.aux_heads and (m.head != "brnpa" or m.num_maps != 3):
    yield Problem("model.aux_heads", True, "the auxiliary heads are the "
                  f"brnpa K=3 ablation (head={m.head!r}, num_maps={m.num_maps})")
  patch = getattr(BACKBONES[m.backbone](**backbone_kwargs(m)), "patch_size", 2)
  if m.get("stem") == "conv" and (patch < 2 or patch & (patch - 1)):
    yield Problem("model.patch_size", patch, "a conv stem halves the image "
                  "with each of its 3x3 convolutions: use 2, 4, 8 or 16")
    return
  size = _hw(get("data.image_size"))
  h, w = feature_grid(m, size)
  where = (f"the {h}x{w} feature grid of {m.backbone} at res={m.res} on "
           f"{size[0]}x{size[1]} images")
  if min(h, w) < 1:
    yield Problem("data.image_size", size, f"smaller than one cell of {where}; "
                  "use larger images")
  elif m.head == "brnpa" and m.num_maps > h * w:
    n = h * w
    yield Problem("model.num_maps", m.num_maps, f"BR-NPA ranks at most the "
                  f"{n} position{'s' * (n > 1)} of {where} (lower k=, or raise "
                  "data.image_size or use res=high)")


def _task_problems(config, task: str, get) -> Iterable[Problem]:
  """Cross-field rules of each task (names, splits, divisibility)."""
  name = get("data.name")
  if name is not _MISSING and task in DATASETS and name not in DATASETS[task]:
    yield Problem("data.name", name, f"the {task} task reads "
                  f"{list(DATASETS[task])}")
  splits = fewshot_data.SPLITS if task == "fewshot" else catalog.SPLITS
  for path in ("data.train_split", "data.eval_splits"):
    value = get(path)
    names = [value] if isinstance(value, str) else value
    if value is _MISSING:
      continue
    if (not names or not all(isinstance(n, str) for n in names)
        or any(b not in splits for n in names for b in catalog.split_names(n))):
      yield Problem(path, value, f"valid splits are {list(splits)}" + (
          "" if task == "fewshot" else ", or slices such as test[:100]"))
  if task == "distill" and not config.distill.teacher_workdir:
    yield Problem("distill.teacher_workdir", "", "task='distill' needs the "
                  "teacher's workdir")
  if task == "fewshot":
    fs = config.fewshot
    if fs.select_shots not in tuple(fs.eval_shots):
      yield Problem("fewshot.select_shots", fs.select_shots,
                    f"must be one of eval_shots {tuple(fs.eval_shots)}")
    if fs.phase == "episodic":
      rows = fs.train_ways * (fs.train_shots + fs.train_queries)
      if not fs.pretrain_workdir:
        yield Problem("fewshot.pretrain_workdir", "", "phase=episodic starts "
                      "from a pretraining run: name its workdir")
      if config.get("grad_accum_steps", 1) != 1:
        yield Problem("grad_accum_steps", config.grad_accum_steps,
                      "phase=episodic needs 1 (micro-batches would cut episodes)")
      if config.batch_size % rows:
        yield Problem("batch_size", config.batch_size, "must be whole training "
                      f"episodes of {fs.train_ways} x ({fs.train_shots} + "
                      f"{fs.train_queries}) = {rows} rows")
      if get("distill.teacher_workdir") not in (_MISSING, ""):
        yield Problem("distill.teacher_workdir", config.distill.teacher_workdir,
                      "distillation applies to phase=pretrain; clear it")
    if name == "folder" and not get("data.folder.root"):
      yield Problem("data.folder.root", "", "an image folder's few-shot "
                    "config needs its root (the root= switch)")
  if task == "reid":
    d = config.data
    p, k = d.ids_per_batch, d.images_per_id
    if _hw(d.image_size) != (d.height, d.width):
      yield Problem("data.image_size", d.image_size,
                    f"must be (data.height, data.width) = ({d.height}, {d.width})")
    if p * k != config.batch_size:
      yield Problem("batch_size", config.batch_size, "must equal "
                    f"data.ids_per_batch x data.images_per_id = {p} x {k}")
    accum = config.get("grad_accum_steps", 1)
    if _is_int(accum) and accum >= 1 and (k % accum or k // accum < 2):
      yield Problem("grad_accum_steps", accum, f"must divide images_per_id={k} "
                    "and leave 2 images of each identity per micro-batch")


def problems(config) -> list[Problem]:
  """Every bad field of ``config`` (empty: it validates)."""
  get = lambda path: _get(config, path)
  task = config.get("task", "classification")
  required = REQUIRED + sum((REQUIRED_BY.get(get(k), ()) for k in
                             ("optim.name", "optim.schedule")),
                            REQUIRED_BY.get(task, ()))
  out = [Problem(p, _MISSING, "the config file must define it")
         for p in required if get(p) is _MISSING]
  for path, rule in FIELDS.items():
    value = get(path)
    if value is not _MISSING and not rule.ok(value):
      out.append(Problem(path, value, f"valid values are {rule.text}"))
  if out:  # the cross-field rules assume valid fields
    return out
  batch, accum = config.batch_size, config.get("grad_accum_steps", 1)
  if batch % accum:
    out.append(Problem("batch_size", batch, f"must be a multiple of "
                       f"grad_accum_steps={accum} (micro-batches per step)"))
  devices, fsdp = config.mesh.num_devices, config.mesh.fsdp
  if devices and devices % fsdp:
    out.append(Problem("mesh.fsdp", fsdp,
                       f"must divide mesh.num_devices={devices}"))
  if get("data.name") == "parts" and get("data.parts") is not _MISSING:
    p = config.data.parts
    types = p.get("num_part_types")
    if types is not None and not (_is_int(types) and types >= p.parts_per_class):
      out.append(Problem("data.parts.num_part_types", types,
                         f"valid values are None or integers >= "
                         f"parts_per_class={p.parts_per_class}"))
    else:
      try:
        parts.class_part_types(p)
      except ValueError as e:
        out.append(Problem("data.parts.num_classes", p.num_classes,
                           str(e).rstrip(".")))
  out += _model_problems(config, get)
  out += _task_problems(config, task, get)
  return out


def message(problem: Problem, flag: str = "--config") -> str:
  """One line: the field, its value, what is valid, the flag that fixes it."""
  name = f"{flag}.{problem.path}"
  if problem.value is _MISSING:
    return f"{name} is missing: {problem.reason}."
  return f"{name}={problem.value!r}: {problem.reason}; set it with {name}=VALUE."


def validate(config, flag: str = "--config") -> None:
  """Raises one ``ConfigError`` (at most two lines) when a field is bad.

  Args:
    config: a run's config (a ConfigDict, as a config file returns it).
    flag: the command-line flag that holds it, for the message.

  Raises:
    ConfigError: the first bad field, and how many others there are.
  """
  found = problems(config)
  if found:
    more = sorted({p.path for p in found[1:]} - {found[0].path})
    raise ConfigError(message(found[0], flag) + (
        f"\n({len(more)} more: {', '.join(more[:6])}"
        f"{', ...' if len(more) > 6 else ''})" if more else ""))


def check_search_space(config, space, set_value: Callable, flags=None) -> None:
  """Checks that every value a sweep can draw gives a valid config.

  Args:
    config: the sweep's base config (already valid).
    space: config path -> ``(kind, values)``: ``'choice'`` and its values,
      or a range kind and its ``(lo, hi)`` ends (both are tried).
    set_value: ``(config, {path: value}) -> config`` with the value set.
    flags: config path -> the sweep's flag that sets its values (for the
      message), e.g. ``{'batch_size': '--batch_sizes'}``.

  Raises:
    ConfigError: naming the value, why it fails, and the flag.
  """
  for path, (_, values) in space.items():
    for value in values:
      bad = problems(set_value(config, {path: value}))
      if bad:
        source = (flags or {}).get(path, "the sweep's search space")
        raise ConfigError(f"{source}: {path}={value!r} gives an invalid config: "
                          f"{bad[0].path}: {bad[0].reason}.")
