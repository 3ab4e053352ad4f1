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

from brnpa_jax import cli
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
  cli.define_multiprocess_flags(fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  cli.start_jax(fv)  # jax.distributed.initialize first under --multiprocess
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
