r"""Quantus 0.6.0 against our batched, jitted metrics: seconds and values.

  python -m benchmarks.xai --reference_python /path/to/env/bin/python   # 100 images
  python -m benchmarks.xai --reference_python ... --smoke               # 4 images

One run, one model, one set of maps: the converted ``resnet_tiny`` of the
golden tests (random torchvision-layout weights), N random 32x32 images,
smooth signed maps and box masks (``xai_golden.golden_inputs``). The
Quantus side runs as a subprocess in the reference environment
(``brnpa_jax/tools/quantus_reference.py``: quantus, torch; this process
needs neither); ours runs here. Both use the same settings: Quantus's
defaults except pixel flipping (64 features per step: Quantus asks for a
divisor of H*W) and the sensitivities (10 draws of the noise, the input
gradient as the explainer). The random draws Quantus made are recorded and
passed to ours, so the values can be compared: the table gives each
metric's seconds (Quantus; ours with compilation, and again once compiled),
the ratio, and the largest difference of a per-image value (ROAD: of the
0/1 curves; pixel flipping: at the steps that end on a whole pixel).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax.explain import (complexity, faithfulness, localisation,
                               robustness)
from brnpa_jax.models import weights
from brnpa_jax.models.registry import build_model
from brnpa_jax.tools import xai_golden
from brnpa_jax.tools.weights_golden import random_state_dict

FC = dict(nr_runs=100, subset_size=224)
FLIP = 64
SENS = dict(nr_samples=10, lower_bound=0.2)
ROAD = dict(percentages=list(range(1, 100, 2)), noise=0.01, seed=100)


def jobs() -> list[dict]:
  q = lambda name, metric, **kw: dict(name=name, kind="quantus", metric=metric, **kw)
  return [
      q("entropy", "Complexity"), q("sparseness", "Sparseness"),
      q("rank_accuracy", "RelevanceRankAccuracy"),
      q("mass_accuracy", "RelevanceMassAccuracy"),
      q("top_k", "TopKIntersection", kwargs=dict(k=1000)),
      q("faithfulness_correlation", "FaithfulnessCorrelation",
        kwargs=dict(return_aggregate=False, **FC), seed=11, record="choice"),
      q("pixel_flipping", "PixelFlipping", kwargs=dict(features_in_step=FLIP)),
      q("region_perturbation", "RegionPerturbation"),
      q("max_sensitivity", "MaxSensitivity", kwargs=SENS, seed=21,
        call=dict(explain=True), record="uniform"),
      q("avg_sensitivity", "AvgSensitivity", kwargs=SENS, seed=22,
        call=dict(explain=True), record="uniform"),
      dict(name="road", kind="road_pixels", seed=ROAD["seed"],
           kwargs=dict(percentages=ROAD["percentages"], noise=ROAD["noise"])),
  ]


def road_noise(maps, images, percentages, sigma, seed):
  """The noise Quantus's imputation draws (seeded per call), placed."""
  b, h, w, c = images.shape
  ranked = np.argsort(-maps.reshape(b, -1), axis=1, kind="stable")
  noise = np.zeros((b, len(percentages), h * w, c), np.float32)
  for i in range(b):
    for j, p in enumerate(percentages):
      k = int(h * w * p / 100)
      z = np.random.RandomState(seed + 1000 * i + j).randn(c, k)
      noise[i, j, ranked[i, :k]] = sigma * z.T
  return noise.reshape(b, len(percentages), h, w, c)


def ours(data, ref) -> dict[str, tuple]:
  """name -> (callable returning values, comparison mask or None)."""
  net = build_model(_model_config(), xai_golden.CLASSES)
  flat = weights.torch_to_flat(random_state_dict(
      xai_golden.ARCH, xai_golden.CLASSES, seed=xai_golden.WEIGHT_SEED))
  abstract = jax.eval_shape(lambda: net.init(jax.random.key(0),
                                             jnp.zeros((1, 32, 32, 3))))
  variables = weights.load_pretrained(abstract, flat)
  apply_fn = lambda v, x: net.apply(v, x, train=False)[0]
  faith = faithfulness.Faithfulness(apply_fn, chunk_size=256)
  x, a, s, y = data["images"], data["maps"], data["masks"], ref["labels"]
  b, h, w, c = x.shape

  @jax.jit
  def explain(xx, yy):
    grad = jax.grad(lambda z: jnp.sum(jnp.take_along_axis(
        apply_fn(variables, z), yy[:, None], 1)))(xx)
    return grad.sum(-1)

  draws = ref.get("faithfulness_correlation/draws", np.zeros((b, 1), np.int16))
  subsets = draws.reshape(-1, b, draws.shape[-1]).transpose(1, 0, 2)
  noise = {k: ref[f"{k}/draws"].reshape(-1, b, c, h, w).transpose(0, 1, 3, 4, 2)
           for k in ("max_sensitivity", "avg_sensitivity") if f"{k}/draws" in ref}
  rn = road_noise(a, x, ROAD["percentages"], ROAD["noise"], ROAD["seed"])
  aligned = ((np.arange(h * w * c // FLIP) + 1) * FLIP) % c == 0
  sens = lambda k, f: lambda: f(robustness.sensitivity_ratios(
      explain, x, y, noise_NxBxHxWxC=noise[k]))
  arr = lambda f: lambda: np.asarray(f())
  return {
      "entropy": (arr(lambda: complexity.entropy(a)), None),
      "sparseness": (arr(lambda: complexity.sparseness(a)), None),
      "rank_accuracy": (arr(lambda: localisation.relevance_rank_accuracy(a, s)), None),
      "mass_accuracy": (arr(lambda: localisation.relevance_mass_accuracy(a, s)), None),
      "top_k": (arr(lambda: localisation.top_k_intersection(a, s, k=1000)), None),
      "faithfulness_correlation": (lambda: faith.faithfulness_correlation(
          variables, x, a, y, subsets_BxRxS=subsets), None),
      "pixel_flipping": (lambda: faith.pixel_flipping(
          variables, x, a, y, features_in_step=FLIP), aligned),
      "region_perturbation": (lambda: faith.region_perturbation(
          variables, x, a, y), None),
      "max_sensitivity": (sens("max_sensitivity", robustness.max_sensitivity), None),
      "avg_sensitivity": (sens("avg_sensitivity", robustness.avg_sensitivity), None),
      "road": (lambda: faith.road(variables, x, a, y, percentages=ROAD["percentages"],
                                  noise_BxPxHxWxC=rn), None),
  }


def _model_config(backbone: str = xai_golden.ARCH, width: int = 0):
  """A model config's fields, without ml_collections."""
  fields = dict(backbone=backbone, head="gap", res="low", num_maps=3,
                refine=True, init="norm", aux_heads=False, dropout=0.0,
                use_bias=True, width=width)
  return types.SimpleNamespace(**fields, get=lambda k, d=None: fields.get(k, d))


def measure(n: int, python: str, only=None, save=None) -> list[dict]:
  """The table's rows; ``only``: these metrics; ``save``: an .npz path for
  both sides' values."""
  data = xai_golden.golden_inputs(n=n)
  job_list = [j for j in jobs() if not only or j["name"] in only]
  t0 = time.perf_counter()
  ref = xai_golden.run_reference(python, data, job_list, random_state_dict(
      xai_golden.ARCH, xai_golden.CLASSES, seed=xai_golden.WEIGHT_SEED))
  print(f"Quantus side: {time.perf_counter() - t0:.0f} s", flush=True)
  rows, saved = [], {}
  for name, (fn, columns) in ours(data, ref).items():
    if name not in ref:
      continue
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    values = np.asarray(fn(), np.float64)
    warm = time.perf_counter() - t0
    theirs = np.asarray(ref[name], np.float64)
    saved.update({f"ours/{name}": values, f"quantus/{name}": theirs})
    if columns is not None:
      values, theirs = values[:, columns], theirs[:, columns]
    q = float(ref[f"{name}/seconds"])
    diff = np.abs(values - theirs)
    rows.append(dict(metric=name, quantus_s=q, ours_first_s=first,
                     ours_s=warm, ratio=q / warm,
                     max_diff=float(np.nanmax(diff)),
                     differing=f"{int(np.sum(diff > 1e-4))} of {diff.size}"))
    print(json.dumps(rows[-1]), flush=True)
  if save:
    np.savez_compressed(save, **saved)
  return rows


def measure_ours(images: int, size: int, backbone: str = "resnet_tiny",
                 chunk: int = 64, width: int = 0) -> list[dict]:
  """Our metrics alone (no reference environment; the GPU suite's job):
  seconds per metric with compilation and once compiled, on ``images``
  random images of ``size`` px, a random ``backbone`` (gap head), the
  evaluation's settings (``explain/suite.py``) and the model's own norm map
  as the explainer of the sensitivities."""
  from brnpa_jax.explain import suite  # pylint: disable=g-import-not-at-top
  cfg = _model_config(backbone, width)
  net = build_model(cfg, xai_golden.CLASSES)
  variables = jax.jit(lambda: net.init(jax.random.key(0),
                                       jnp.zeros((1, size, size, 3))))()
  forward = jax.jit(lambda x: net.apply(variables, x, train=False))
  faith = faithfulness.Faithfulness(lambda v, x: net.apply(v, x, train=False)[0],
                                    chunk_size=chunk)
  data = xai_golden.golden_inputs(n=images, size=size)
  logits, aux = forward(data["images"])
  x = suite.Inputs(faith, variables, jnp.asarray(data["images"]), data["maps"],
                   jnp.argmax(logits, -1), data["masks"],
                   explain_fn=lambda xx, yy: metrics_upsampled(forward(xx)[1], size))
  x.saliency = np.asarray(metrics_upsampled(aux, size))
  rows = []
  for name in suite.METRICS:
    t0 = time.perf_counter()
    suite.compute([name], x)
    first = time.perf_counter() - t0
    x._cache.pop("ratios", None)
    t0 = time.perf_counter()
    suite.compute([name], x)
    rows.append(dict(metric=name, ours_first_s=first,
                     ours_s=time.perf_counter() - t0, images=images, size=size,
                     backbone=backbone))
    x._cache.pop("ratios", None)
  return rows


def metrics_upsampled(aux, size):
  """The norm map at the input resolution."""
  from brnpa_jax.explain import metrics  # pylint: disable=g-import-not-at-top
  return metrics.upsample(aux["norms"], (size, size))


def table(rows, n: int) -> str:
  cpu = platform.processor() or platform.machine()
  lines = [f"{n} images of 32x32, resnet_tiny, {cpu}, {jax.devices()[0].platform}", "",
           "| metric | Quantus 0.6.0 (s) | ours, first call (s) | ours (s) | "
           "ratio | largest difference | values differing by > 1e-4 |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['metric']} | {r['quantus_s']:.2f} | {r['ours_first_s']:.2f} "
                 f"| {r['ours_s']:.3f} | {r['ratio']:.1f}x | {r['max_diff']:.1e} "
                 f"| {r['differing']} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reference_python", required=True,
                 help="python of the environment with quantus 0.6.0 and torch")
  p.add_argument("--images", type=int, default=100)
  p.add_argument("--smoke", action="store_true", help="4 images")
  p.add_argument("--only", default="", help="comma-separated metrics (default: all)")
  p.add_argument("--save", default=None, help="an .npz for both sides' values")
  args = p.parse_args(argv)
  n = 4 if args.smoke else args.images
  only = [m for m in args.only.split(",") if m]
  print(table(measure(n, args.reference_python, only, args.save), n))


if __name__ == "__main__":
  main()
