"""Restoring a run's weights read-only: inference, export, evaluation,
distillation teachers and few-shot pretraining all go through ``load_run``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from brnpa_jax.models import build_model
from brnpa_jax.models.reid import build_reid_model
from brnpa_jax.models.weights import check_same_tree
from brnpa_jax.runs.checkpoints import restore_variables
from brnpa_jax.runs.workdir import RunError, Workdir

# config.task -> the model builder its runs were trained with.
_BUILDERS = {"reid": build_reid_model}


@dataclasses.dataclass
class RestoredRun:
  """A finished (or running) run's model with its weights.

  Attributes:
    model: the unbound model its config describes.
    variables: ``{'params': ..., 'batch_stats': ...}`` of the checkpoint.
    config: the run's config (its ``config.json``).
    step: the checkpoint's step.
    checkpoint: ``best`` or ``latest``.
    num_classes: outputs of its classifier.
    workdir: the run's ``Workdir``.
    class_names: the dataset's class names in label order, or None.
  """
  model: Any
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  step: int
  checkpoint: str
  num_classes: int
  workdir: Workdir
  class_names: list[str] | None = None


def image_hw(data_cfg) -> tuple[int, int]:
  """(H, W) of a data config's ``image_size`` (an int or a pair)."""
  size = data_cfg.image_size
  return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def load_run(workdir: str, *, checkpoint: str = "auto",
             num_classes: int | None = None, dtype: str | None = None
             ) -> RestoredRun:
  """Restores a run's model from its ``config.json`` and checkpoint.

  The restored variables are checked strictly against the model the config
  describes: any missing, unexpected or mis-shaped leaf is an error that
  lists them all.

  Args:
    workdir: the run's workdir.
    checkpoint: ``auto`` (best, else latest), ``best`` or ``latest``.
    num_classes: the classes the caller expects (e.g. a distillation
      student's); None takes the checkpoint's.
    dtype: compute dtype of the rebuilt model; None: the run's.

  Raises:
    RunError: the workdir has no config.json.
    FileNotFoundError: it has no checkpoint of the kind asked for.
    ValueError: the checkpoint does not fit the model (lists the leaves).
  """
  wd = Workdir(workdir)
  config = wd.read_config()
  variables, step, which = restore_variables(wd.path, checkpoint)
  variables.setdefault("batch_stats", {})
  stored_classes = int(variables["params"]["classifier"]["kernel"].shape[-1])
  num_classes = stored_classes if num_classes is None else num_classes
  build = _BUILDERS.get(config.get("task", "classification"), build_model)
  try:
    model = build(config.model, num_classes,
                  dtype or config.get("dtype", "float32"))
    image_hw(config.data)
  except (AttributeError, KeyError, TypeError) as e:
    # A config.json edited or damaged into another shape than a run's.
    raise RunError(f"{wd.config_file} does not describe a model "
                   f"({type(e).__name__}: {e}): restore it, or train again "
                   "in a new workdir.") from e
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *image_hw(config.data), 3)), train=False))
  expected = {k: expected.get(k, {}) for k in ("params", "batch_stats")}
  check_same_tree(variables, expected,
                  what=f"the {which} checkpoint of {wd.path}",
                  hint=f"Its config.json describes a {num_classes}-class "
                  f"{config.model.backbone} {config.model.head} model; the "
                  "checkpoint was written by another.")
  names = wd.read_class_names()
  if names is not None and len(names) != num_classes:
    names = None  # another class count than the caller's (a student's data)
  return RestoredRun(model, variables, config, step, which, num_classes, wd,
                     names)
