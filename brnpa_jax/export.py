r"""Exports a trained run's inference function to a file that runs without the
model code.

  python -m brnpa_jax.export --workdir runs/default --out runs/default/model.jaxexport

The artifact (``brnpa_jax.artifact``) holds ``jax.export`` of
``models.classifier.make_infer_fn`` with a symbolic batch, the model
variables and metadata; ``brnpa_jax.artifact.load_exported`` reads it with
jax and numpy alone, and ``python -m brnpa_jax.predict --exported FILE``
runs it.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import flags

from brnpa_jax import cli
from brnpa_jax.artifact import export_inference, load_exported, save_exported
from brnpa_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from brnpa_jax.models.classifier import make_infer_fn
from brnpa_jax.runs import load_run

# What jax.export lowers for (any of them, on any machine).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_run(workdir: str, out: str, *, checkpoint: str = "auto",
               platforms: Sequence[str] | None = None) -> str:
  """Restores a run (``runs.load_run``) and writes its artifact to ``out``."""
  run = load_run(workdir, checkpoint=checkpoint)
  data = run.config.data
  exported = export_inference(make_infer_fn(run.model), run.variables,
                              data.image_size, platforms)
  meta = {"image_size": int(data.image_size), "input_dtype": "float32",
          "resize_ratio": float(data.resize_ratio),
          "resize": data.get("resize", "short_side"),
          "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                            "scale": 1 / 255},
          "num_classes": run.num_classes, "class_names": run.class_names,
          "model": dict(run.config.model.to_dict()),
          "workdir": run.workdir.path, "step": run.step,
          "checkpoint": run.checkpoint}
  return save_exported(out, exported, run.variables, meta)


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  cli.define_run_flags(fv)
  flags.DEFINE_string("out", None, "Artifact path to write.", flag_values=fv)
  flags.DEFINE_list("platforms", None, "Platforms to lower for, of "
                    f"{', '.join(PLATFORMS)}; e.g. cpu,cuda (default: this "
                    "backend).", flag_values=fv)
  flags.register_validator(
      "platforms", lambda names: not set(names or ()) - set(PLATFORMS),
      f"valid platforms are {', '.join(PLATFORMS)} (a GPU is cuda or rocm).",
      flag_values=fv)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def _main(fv: flags.FlagValues) -> str:
  t = time.time()
  path = export_run(fv.workdir, fv.out, checkpoint=fv.checkpoint,
                    platforms=fv.platforms)
  model = load_exported(path)
  print(f"Wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, platforms "
        f"{model.meta['platforms']}, input (b, {', '.join(map(str, model.image_shape))}) in "
        f"{time.time() - t:.1f} s).")
  return path


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: ``python -m brnpa_jax.export --workdir RUN --out FILE``."""
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.export")


if __name__ == "__main__":
  raise SystemExit(main())
