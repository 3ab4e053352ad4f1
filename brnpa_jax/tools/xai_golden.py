r"""Golden values of Quantus 0.6.0's metrics, for tests/test_quantus_golden.py.

  python -m brnpa_jax.tools.xai_golden --python /path/to/reference/bin/python \
      --out tests/golden

The reference environment needs ``quantus==0.6.0`` with torch, torchvision,
numpy and scipy (the ``xai`` extra; docs/explanations.md). This tool writes the
inputs (the converted ``resnet_tiny`` of ``weights_golden.random_state_dict``,
4 random 32x32 images, smooth signed maps without ties, box masks), runs
``quantus_reference.py`` on them in that environment, and stores inputs and
Quantus's values in ``quantus_metrics.npz`` (with the libraries' versions).
Quantus's random draws (faithfulness correlation's subsets, the
sensitivities' noise) are recorded as it made them and stored; ROAD's noise is
seeded right before each imputation, so the test draws it again with numpy's
legacy ``RandomState``. The test passes them to our functions explicitly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from absl import flags

from brnpa_jax import cli
from brnpa_jax.errors import UserError
from brnpa_jax.tools.weights_golden import random_state_dict

ARCH, CLASSES, WEIGHT_SEED = "resnet_tiny", 10, 1
SHAPE = (4, 32, 32, 3)
FC = dict(nr_runs=20, subset_size=224, seed=11)
SENS = dict(nr_samples=5, lower_bound=0.2)
ROAD = dict(percentages=[5, 25, 50, 75, 95], noise=0.01, seed=100)
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                         "quantus_reference.py")


def golden_inputs(seed: int = 0, n: int = SHAPE[0], size: int = SHAPE[1]
                  ) -> dict[str, np.ndarray]:
  """Images, maps and masks of the golden file (the defaults), or of ``n``
  images of ``size`` px drawn the same way (``benchmarks.xai``)."""
  from scipy.ndimage import gaussian_filter  # scipy comes with jax
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  maps = gaussian_filter(rng.normal(size=(n, size, size)), (0, 2, 2))
  maps = maps / np.abs(maps).max() + 1e-4 * rng.random(maps.shape)
  masks = np.zeros((n, size, size), np.float32)
  half = size // 2
  for i in range(n):
    y0, x0 = rng.integers(0, half, 2)
    masks[i, y0:y0 + rng.integers(6, half), x0:x0 + rng.integers(6, half)] = 1
  return {"images": images, "maps": maps.astype(np.float32), "masks": masks}


def jobs() -> list[dict]:
  q = lambda name, metric, **kw: dict(name=name, kind="quantus", metric=metric, **kw)
  return [
      q("entropy", "Complexity"), q("sparseness", "Sparseness"),
      q("rank_accuracy", "RelevanceRankAccuracy"),
      q("mass_accuracy", "RelevanceMassAccuracy"),
      q("top_k", "TopKIntersection", kwargs=dict(k=1000)),
      q("top_k_100_ci", "TopKIntersection",
        kwargs=dict(k=100, concept_influence=True)),
      q("faithfulness_correlation", "FaithfulnessCorrelation",
        kwargs=dict(nr_runs=FC["nr_runs"], subset_size=FC["subset_size"],
                    return_aggregate=False), seed=FC["seed"],
        record="choice"),
      q("pixel_flipping_16", "PixelFlipping", kwargs=dict(features_in_step=16)),
      q("region_perturbation_8", "RegionPerturbation", kwargs=dict(patch_size=8)),
      q("region_perturbation_6_lerf", "RegionPerturbation",
        kwargs=dict(patch_size=6, order="lerf")),
      q("max_sensitivity", "MaxSensitivity", kwargs=SENS, seed=21,
        call=dict(explain=True), record="uniform"),
      q("avg_sensitivity", "AvgSensitivity", kwargs=SENS, seed=22,
        call=dict(explain=True), record="uniform"),
      dict(name="imputation_50", kind="imputation", kwargs=dict(image=0, percent=50)),
      dict(name="road_morf", kind="road_pixels", seed=ROAD["seed"],
           kwargs=dict(percentages=ROAD["percentages"], noise=ROAD["noise"])),
      dict(name="road_lerf", kind="road_pixels", seed=ROAD["seed"],
           kwargs=dict(percentages=ROAD["percentages"], noise=ROAD["noise"],
                       order="lerf")),
      dict(name="quantus_road_error", kind="quantus_road",
           kwargs=dict(percentages=[10])),
  ]


def run_reference(python: str, inputs: dict[str, np.ndarray], job_list,
                  state_dict) -> dict[str, np.ndarray]:
  """Runs ``quantus_reference.py`` with ``python`` on the inputs."""
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(src, jobs=np.array(json.dumps(job_list)), **inputs,
             **{f"sd/{k}": v for k, v in state_dict.items()})
    proc = subprocess.run([python, REFERENCE, src, dst], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
      raise UserError(f"The reference run failed ({python}):\n"
                      + proc.stderr.strip().splitlines()[-1])
    with np.load(dst) as f:
      return {k: f[k] for k in f.files}


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("out", os.path.join("tests", "golden"),
                      "Folder for the golden file.", flag_values=fv)
  flags.DEFINE_string("python", sys.executable, "Python of the reference "
                      "environment (quantus 0.6.0, torch, torchvision).",
                      flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  inputs = golden_inputs()
  ref = run_reference(fv.python, inputs, jobs(),
                      random_state_dict(ARCH, CLASSES, seed=WEIGHT_SEED))
  out = {**inputs, **{f"quantus/{k}": v for k, v in ref.items()
                      if not k.endswith("/seconds")}}
  os.makedirs(fv.out, exist_ok=True)
  path = os.path.join(fv.out, "quantus_metrics.npz")
  np.savez_compressed(path, **out)
  print(f"{path}: {os.path.getsize(path)} bytes; {ref['versions']}")


def main(argv=None) -> int:
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.xai_golden")


if __name__ == "__main__":
  raise SystemExit(main())
