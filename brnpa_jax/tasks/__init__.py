"""Tasks: what each problem adds to the shared trainer (data, loss, metrics).

``config.task`` names one of ``TASKS``; modules load on first use, so a task's
own dependencies are imported only by runs that use it.
"""

from __future__ import annotations

import importlib

TASKS = {
    "classification": "brnpa_jax.tasks.classification:ClassificationTask",
    "distill": "brnpa_jax.tasks.distill:DistillationTask",
    "fewshot": "brnpa_jax.tasks.fewshot:FewShotTask",
    "reid": "brnpa_jax.tasks.reid:ReIDTask",
}


def get_task(config):
  """The ``Task`` that ``config.task`` names (default: classification)."""
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; valid: {sorted(TASKS)}.")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)(config)
