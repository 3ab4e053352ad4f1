r"""Trains a BR-NPA model (or a baseline) from an ml_collections config.

  python train.py --config configs/default.py --workdir runs/default

Rerunning the same command resumes from the newest checkpoint in --workdir.
For several hosts, pass --multiprocess (or run under a launcher that sets
JAX's distributed environment) to call jax.distributed.initialize() first.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an arg: 'configs/default.py:head=bcnn'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and "
                               "overlays are written; a rerun resumes from it.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() first (arguments "
    "auto-detected on TPU pods, SLURM and Open MPI unless given below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, with --multiprocess.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --multiprocess.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --multiprocess.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so --help is fast

  if _MULTIPROCESS.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from brnpa_jax.train.trainer import train_and_evaluate

  # Orbax and clu log every save and scalar at INFO; progress is printed
  # instead. --verbosity=0 brings the INFO log back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
