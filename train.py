r"""Trains a BR-NPA model (or a baseline) from an ml_collections config.

  python train.py --config configs/default.py --workdir runs/default

Rerunning the same command resumes from the newest checkpoint in --workdir;
a finished run prints its summary again. A run is resumed only under the
config it was started with. For several hosts, pass --multiprocess (or run
under a launcher that sets JAX's distributed environment) to call
jax.distributed.initialize() first.
"""

import sys

from absl import flags, logging

from brnpa_jax import cli, quiet
from brnpa_jax.config_file import define_config_flag


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  define_config_flag(fv, argv, "Config file, optionally with an arg: "
                     "'configs/default.py:head=bcnn'; fields with "
                     "--config.<field>=<value>.")
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and overlays "
                      "are written; a rerun resumes from it.", flag_values=fv)
  flags.DEFINE_bool("allow_config_change", False, "Resume an unfinished run "
                    "although the config differs from its config.json (the "
                    "change is recorded in the workdir).", flag_values=fv)
  flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize() "
                    "first (arguments auto-detected on TPU pods, SLURM and Open "
                    "MPI unless given below).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, "
                      "with --multiprocess.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "With --multiprocess.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("process_id", None, "With --multiprocess.",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "With --multiprocess: "
                       "a process that stops answering for this long ends the "
                       "run on every host, with an error.", lower_bound=1,
                       flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  import jax  # after flag parsing, so --help is fast

  if fv.multiprocess:
    jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                               num_processes=fv.num_processes,
                               process_id=fv.process_id,
                               heartbeat_timeout_seconds=fv.heartbeat_timeout_seconds)
  quiet.start_jax()  # after distributed.initialize, which must come first
  from brnpa_jax.explain.figures import draw
  from brnpa_jax.train.trainer import train_and_evaluate

  # Orbax and clu log every save and scalar at INFO; progress is printed
  # instead.
  logging.set_verbosity(logging.WARNING)
  train_and_evaluate(fv.config, fv.workdir, draw=draw,
                     allow_config_change=fv.allow_config_change)


if __name__ == "__main__":
  sys.exit(cli.run(define_flags, main, doc=__doc__, prog="train.py",
                   start_jax=False))
