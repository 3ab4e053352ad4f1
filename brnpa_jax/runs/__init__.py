"""A run's workdir: the one place that knows its layout.

A workdir holds:

- ``config.json``: the config the run was started with, written once;
- ``checkpoints/``: the newest train states (orbax), for resuming;
- ``best/``: the state with the best validation score;
- ``summary.json``: written when the run finishes (a finished run is never
  trained or rewritten again);
- ``metrics.jsonl``, TensorBoard events and ``overlays/``.

``Workdir`` reads and writes the files and guards the config (a run is never
resumed under a config it was not trained with); ``Checkpointer`` saves and
restores train states, falling back to an older checkpoint when the newest
does not restore; ``load_run`` restores a run's weights read-only, for
inference, export, evaluation, distillation teachers and few-shot
pretraining.
"""

from brnpa_jax.runs.checkpoints import Checkpointer, abstract_like, restore_variables
from brnpa_jax.runs.restore import RestoredRun, load_run
from brnpa_jax.runs.workdir import (RESUME_SAFE_FIELDS, ConfigMismatchError,
                                    RunError, Workdir)

__all__ = ["Checkpointer", "ConfigMismatchError", "RESUME_SAFE_FIELDS",
           "RestoredRun", "RunError", "Workdir", "abstract_like", "load_run",
           "restore_variables"]
