r"""Evaluates trained runs: accuracy and every map metric, own maps and post-hoc.

  python -m brnpa_jax.explain.evaluate --split test --out runs/eval \
      --workdir runs/brnpa --methods own \
      --workdir runs/gap --methods own,gradcam,gradcampp,scorecam,rise \
      --workdir runs/bcnn --methods own

For each ``--workdir`` the best checkpoint is restored (its config is the
``config.json`` the trainer writes there, or ``--config PATH[:ARGS]`` given
once per workdir, in the same order). ``--methods`` is given once (for every
run) or once per workdir; ``own`` is the model's own map (SPEC section 6:
BR-NPA map 1 x norm, bcnn mean of its maps x norm, gap the norm map), the
others are post-hoc explainers of the class the model predicts.
``--dtype bfloat16`` runs the deletion and insertion forwards in bfloat16.

Per image and per (run, method): accuracy, sparsity, deletion and insertion
AUC (``--protocol release``: feature-map cells, one step per cell;
``standard``: RISE's pixels; ``both``), pointing game and energy pointing game
against ``--mask_key`` (the embedded dataset's ``part_mask`` by default).
Written to ``--out``: ``results.md``, ``results.csv``, ``results.json`` (means
with 95% t confidence intervals, and the two-sided Wilcoxon signed-rank test
of each row against ``--reference``, paired by image), ``per_image.npz``, the
method grid ``methods_grid.png`` and the mean curves ``curves.png``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from brnpa_jax import predict
from brnpa_jax.data import input_pipeline
from brnpa_jax.explain import metrics
from brnpa_jax.models import build_model

LOWER_IS_BETTER = ("sparsity", "dauc", "dauc_std")
METRIC_NAMES = {
    "accuracy": "accuracy", "sparsity": "sparsity", "dauc": "DAUC",
    "iauc": "IAUC", "dauc_std": "DAUC (std.)", "iauc_std": "IAUC (std.)",
    "pointing": "pointing game", "energy": "energy PG"}


# -- runs --------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """A restored model: what evaluation needs of one workdir."""
  name: str
  config: Any
  model: Any
  variables: Any
  head: str


def load_config(workdir: str, config_arg: str | None = None):
  """The run's config: ``--config PATH[:ARGS]`` if given, else config.json."""
  return predict.load_config(workdir, predict.config_from_arg(config_arg))


def load_run(workdir: str, config_arg: str | None = None) -> Run:
  """Restores the best checkpoint's weights of ``workdir`` (no optimiser
  state, no training task: ``brnpa_jax.predict.load_run``)."""
  config = load_config(workdir, config_arg)
  if not os.path.isdir(os.path.join(workdir, "best")):
    raise FileNotFoundError(f"{workdir}/best does not exist: train the run "
                            "first (python train.py --workdir ...).")
  run = predict.load_run(workdir, config, checkpoint="best")
  return Run(os.path.basename(os.path.normpath(workdir)), config, run.model,
             run.variables, config.model.head)


# -- per-image metrics -------------------------------------------------------------
def own_maps(aux, head: str):
  """(saliency (B, h, w), sparsity (B,)) of a model's own maps (SPEC 6)."""
  from brnpa_jax.explain.explainers import own_saliency
  if head == "gap":
    sparsity = metrics.sparsity(aux["norms"][:, None])
  else:
    sparsity = metrics.sparsity(aux["maps"], aux["norms"])
  return own_saliency(aux, head), sparsity


class Evaluator:
  """Per-image metrics of one run's maps; the jitted functions are built once.

  Attributes:
    run: the restored run.
    protocols: a subset of ('release', 'standard').
    chunk_size: perturbed images per forward.
    dtype: compute dtype of the deletion/insertion forwards (None: the
      run's); the accuracy, the maps and the tracked classes come from the
      run's own forward whatever it is.
  """

  def __init__(self, run: Run, protocols, chunk_size: int, mask_key: str,
               seed: int = 0, options: dict[str, dict[str, Any]] | None = None,
               steps: int | None = None, pixels_per_step: int | None = None,
               tolerance: float = metrics.POINTING_TOLERANCE,
               dtype: str | None = None):
    self.run, self.protocols, self.mask_key = run, tuple(protocols), mask_key
    self.options = options or {}
    self.steps, self.pixels_per_step = steps, pixels_per_step
    self.tolerance = tolerance
    model = run.model
    self.forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    perturbed = model
    if dtype and dtype != run.config.get("dtype", "float32"):
      perturbed = build_model(run.config.model, model.num_classes, dtype)
    apply_fn = lambda v, x: perturbed.apply(v, x, train=False)[0]
    self.curves = metrics.PerturbationCurves(apply_fn, chunk_size=chunk_size)
    self.rng = jax.random.key(seed)

  def saliency(self, method: str, images, predicted, aux):
    """(saliency, sparsity (B,), seconds) of one method on a batch."""
    t0 = time.perf_counter()
    if method == "own":
      sal, sparsity = own_maps(aux, self.run.head)
    else:
      from brnpa_jax.explain.explainers import explain
      self.rng, rng = jax.random.split(self.rng)
      sal = explain(method, self.run.model, self.run.variables, images,
                    predicted, rng=rng, **self.options.get(method, {}))
      sparsity = metrics.sparsity(jnp.asarray(sal)[:, None])
    sal = jax.block_until_ready(jnp.asarray(sal, jnp.float32))
    return sal, np.asarray(sparsity), time.perf_counter() - t0

  def batch(self, batch, methods, n: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-image values of every metric for each method, for the first n
    (real) examples of a batch."""
    images = jnp.asarray(batch["image"])
    logits, aux = self.forward(self.run.variables, images)
    predicted = jnp.argmax(logits, -1)
    correct = np.asarray(predicted == batch["label"], np.float32)[:n]
    cells = aux["norms"].shape[1:]
    masks = batch[self.mask_key]
    out = {}
    for method in methods:
      sal, sparsity, seconds = self.saliency(method, images, predicted, aux)
      values = {"accuracy": correct, "sparsity": sparsity[:n],
                "explain_seconds": np.full(n, seconds / len(images)),
                "pointing": np.asarray(metrics.pointing_game(
                    sal, masks, tolerance=self.tolerance))[:n],
                "energy": np.asarray(metrics.energy_pointing_game(sal, masks))[:n]}
      if "release" in self.protocols:
        r = self.curves.release(self.run.variables, images,
                                metrics.to_cells(sal, cells), steps=self.steps,
                                classes_B=predicted, num_valid=n)
        values.update(dauc=r["deletion_auc"], iauc=r["insertion_auc"],
                      deletion_curve=r["deletion_curve"],
                      insertion_curve=r["insertion_curve"])
      if "standard" in self.protocols:
        r = self.curves.standard(self.run.variables, images, sal,
                                 pixels_per_step=self.pixels_per_step,
                                 classes_B=predicted, num_valid=n)
        values.update(dauc_std=r["deletion_auc"], iauc_std=r["insertion_auc"],
                      deletion_curve_std=r["deletion_curve"],
                      insertion_curve_std=r["insertion_curve"])
      values["saliency"] = np.asarray(sal)[:n]
      out[method] = values
    return out


def iterate_split(config, split: str, batch_size: int, num_images: int | None,
                  mask_key: str):
  """``(batch, n)`` of a split in order: fixed-shape batches whose first n
  examples are real (at most ``num_images`` in all); the rest is padding,
  kept so that no jitted function sees a new shape."""
  ds = input_pipeline.make_eval_dataset(config.data, split, batch_size=batch_size)
  seen = 0
  for batch in tfds.as_numpy(ds):
    if mask_key not in batch:
      raise KeyError(f"The {config.data.name!r} dataset has no {mask_key!r}; "
                     f"it has {sorted(batch)}. Choose another --mask_key.")
    n = int(batch["mask"].sum())  # padding only ever follows real examples
    if num_images is not None:
      n = min(n, num_images - seen)
    if n <= 0:
      break
    seen += n
    yield batch, n


# -- statistics ------------------------------------------------------------------
def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
  """Mean and the half-width of its t confidence interval (0 for n < 2)."""
  from scipy import stats  # scipy comes with jax
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()) if len(v) else float("nan"), 0.0
  sem = v.std(ddof=1) / np.sqrt(len(v))
  return float(v.mean()), float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * sem)


def paired_p(a, b) -> float:
  """Two-sided Wilcoxon signed-rank p-value of paired samples (1.0 when no
  pair differs)."""
  from scipy import stats
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if len(d) == 0 or not np.any(d != 0):
    return 1.0
  return float(stats.wilcoxon(d).pvalue)


def summarise(per_image: dict[str, dict[str, np.ndarray]], reference: str
              ) -> list[dict[str, Any]]:
  """One dict per (row, metric): n, mean, 95% CI, p-value against reference."""
  if reference not in per_image:
    raise ValueError(f"--reference {reference!r} is not one of the rows "
                     f"{sorted(per_image)}.")
  out = []
  for row, values in per_image.items():
    for metric in METRIC_NAMES:
      if metric not in values:
        continue
      mean, half = mean_ci(values[metric])
      p = (None if row == reference or metric == "accuracy"
           else paired_p(values[metric], per_image[reference][metric]))
      out.append({"row": row, "metric": metric, "n": len(values[metric]),
                  "mean": mean, "ci95": half, "p_vs_reference": p})
  return out


def write_tables(summary, per_image, out_dir: str, reference: str,
                 info: dict[str, Any]) -> dict[str, str]:
  """results.md / .csv / .json and per_image.npz in ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("md", "csv", "json")}
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(summary[0]))
    w.writeheader()
    w.writerows(summary)
  with open(paths["json"], "w") as f:
    json.dump({"info": info, "reference": reference, "results": summary,
               "seconds_per_image": {
                   row: float(np.mean(v["explain_seconds"]))
                   for row, v in per_image.items()}}, f, indent=2)
  np.savez_compressed(os.path.join(out_dir, "per_image.npz"), **{
      f"{row}/{k}": v for row, vals in per_image.items() for k, v in vals.items()
      if k != "saliency"})
  metrics_present = [m for m in METRIC_NAMES if any(s["metric"] == m for s in summary)]
  cell = {(s["row"], s["metric"]): s for s in summary}
  head = ["run / maps"] + [METRIC_NAMES[m] + (" ↓" if m in LOWER_IS_BETTER else
                                              "" if m == "accuracy" else " ↑")
                           for m in metrics_present]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in per_image:
    entries = [row]
    for m in metrics_present:
      s = cell.get((row, m))
      if s is None:
        entries.append("")
        continue
      text = f"{s['mean']:.3f} ± {s['ci95']:.3f}"
      if s["p_vs_reference"] is not None and s["p_vs_reference"] < 0.05:
        text += " *"
      entries.append(text)
    lines.append("| " + " | ".join(entries) + " |")
  n = summary[0]["n"]
  lines += ["", f"Means over {n} images with 95% t confidence intervals; * marks "
            f"a row that differs from {reference} (two-sided Wilcoxon "
            "signed-rank test paired by image, p < 0.05)."]
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  return paths


# -- figures ---------------------------------------------------------------------
CURVE_PANELS = {"deletion_curve": "deletion (release)",
                "insertion_curve": "insertion (release)",
                "deletion_curve_std": "deletion (standard)",
                "insertion_curve_std": "insertion (standard)"}


def display_name(row: str) -> str:
  """``gap/gradcam`` -> ``gap: Grad-CAM``."""
  from brnpa_jax.explain.explainers import DISPLAY_NAMES
  run, _, method = row.partition("/")
  return f"{run}: {DISPLAY_NAMES.get(method, method)}"


def write_figures(examples, per_image, out_dir: str, num: int = 4) -> list[str]:
  """The method grid of the first ``num`` images and the mean curves."""
  from brnpa_jax.data.transforms import denormalize
  from brnpa_jax.explain import plots
  num = min(num, len(examples["image"]))
  maps = {display_name(row): v["saliency"][:num] for row, v in per_image.items()}
  titles = [f"label {l}" for l in examples["label"][:num]]
  paths = [plots.save_method_grid(
      os.path.join(out_dir, "methods_grid.png"),
      denormalize(examples["image"][:num]), maps, row_titles=titles)]
  panels = {}
  for key, title in CURVE_PANELS.items():
    curves = {display_name(row): (np.linspace(0, 1, v[key].shape[1]),
                                  v[key].mean(0))
              for row, v in per_image.items() if key in v}
    if curves:
      panels[title] = curves
  paths.append(plots.save_curve_panels(os.path.join(out_dir, "curves.png"),
                                       panels))
  return paths


# -- entry point -------------------------------------------------------------------
def _per_workdir(values, workdirs, flag, default):
  if not values:
    return [default] * len(workdirs)
  if len(values) == 1:
    return values * len(workdirs)
  if len(values) != len(workdirs):
    raise ValueError(f"{flag} is given {len(values)} times for {len(workdirs)} "
                     f"--workdir: give it once (for all) or once per workdir.")
  return values


def parse_options(items) -> dict[str, dict[str, Any]]:
  """``['rise.num_masks=1000']`` -> ``{'rise': {'num_masks': 1000}}``."""
  from brnpa_jax.explain.explainers import options_of
  out: dict[str, dict[str, Any]] = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    method, dot, name = key.partition(".")
    if not (sep and dot):
      raise ValueError(f"--option {item!r}: expected METHOD.NAME=VALUE, e.g. "
                       "rise.num_masks=1000.")
    if name not in options_of(method):
      raise ValueError(f"--option {item!r}: {method} takes "
                       f"{sorted(options_of(method))}.")
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value  # a bare string such as baseline=black
    out.setdefault(method, {})[name] = parsed
  return out


def evaluate(workdirs, *, split="test", methods=None, configs=None,
             num_images=None, protocol="release", batch_size=50,
             chunk_size=64, mask_key="part_mask", reference=None, out_dir,
             seed=0, options=None, steps=None, pixels_per_step=None,
             tolerance=metrics.POINTING_TOLERANCE, figures=True, dtype=None
             ) -> dict[str, Any]:
  """Evaluates runs and writes the tables; returns the summary and paths."""
  methods = [m.split(",") for m in _per_workdir(methods, workdirs, "--methods", "own")]
  configs = _per_workdir(configs, workdirs, "--config", None)
  protocols = ("release", "standard") if protocol == "both" else (protocol,)
  per_image: dict[str, dict[str, list]] = {}
  examples, t0 = None, time.time()
  for workdir, config_arg, run_methods in zip(workdirs, configs, methods):
    run = load_run(workdir, config_arg)
    evaluator = Evaluator(run, protocols, chunk_size, mask_key, seed, options,
                          steps, pixels_per_step, tolerance, dtype)
    for batch, n in iterate_split(run.config, split, batch_size, num_images,
                                  mask_key):
      if examples is None:
        examples = {k: v[:n] for k, v in batch.items()}
      for method, values in evaluator.batch(batch, run_methods, n).items():
        row = per_image.setdefault(f"{run.name}/{method}", {})
        for k, v in values.items():
          row.setdefault(k, []).append(v)
    print(f"{run.name}: {', '.join(run_methods)} done "
          f"({time.time() - t0:.0f} s so far)", flush=True)
  if examples is None:
    raise ValueError(f"No examples in split {split!r}.")
  per_image = {row: {k: np.concatenate(v) for k, v in vals.items()}
               for row, vals in per_image.items()}
  reference = reference or next(iter(per_image))
  summary = summarise(per_image, reference)
  info = {"workdirs": list(workdirs), "split": split, "protocols": protocols,
          "num_images": len(next(iter(per_image.values()))["accuracy"]),
          "mask_key": mask_key, "seconds": time.time() - t0,
          "options": options or {}, "release_steps": steps or "one per cell",
          "pixels_per_step": pixels_per_step or "image width",
          "pointing_tolerance_px": tolerance,
          "perturbation_dtype": dtype or "the run's",
          "ci": "95% t interval", "paired_test": "two-sided Wilcoxon signed-rank"}
  paths = write_tables(summary, per_image, out_dir, reference, info)
  if figures:
    paths["figures"] = write_figures(examples, per_image, out_dir)
  return {"summary": summary, "paths": paths, "info": info}


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--workdir", action="append", required=True,
                 help="a run's workdir; repeat for several runs")
  p.add_argument("--config", action="append",
                 help="PATH[:ARGS] of a run's config when its workdir has no "
                      "config.json; once, or once per --workdir")
  p.add_argument("--methods", action="append",
                 help="comma-separated: own and explainers; once, or once per "
                      "--workdir (default: own)")
  p.add_argument("--split", default="test")
  p.add_argument("--out", required=True, help="folder for tables and figures")
  p.add_argument("--num_images", type=int, help="first N examples (default: all)")
  p.add_argument("--protocol", choices=("release", "standard", "both"),
                 default="release")
  p.add_argument("--steps", type=int,
                 help="release protocol steps (default: one per cell; the "
                      "paper also uses 196)")
  p.add_argument("--pixels_per_step", type=int,
                 help="standard protocol (default: the image width, 224 on "
                      "224x224)")
  p.add_argument("--batch_size", type=int, default=50)
  p.add_argument("--chunk_size", type=int, default=64,
                 help="perturbed images per forward in deletion/insertion")
  p.add_argument("--tolerance", type=float, default=metrics.POINTING_TOLERANCE,
                 help="pointing game tolerance in pixels (SPEC: 15)")
  p.add_argument("--mask_key", default="part_mask",
                 help="ground truth of the pointing games")
  p.add_argument("--reference", help="row of the paired tests (default: the "
                 "first, e.g. brnpa/own)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--option", action="append",
                 help="an explainer option, METHOD.NAME=VALUE (repeatable), "
                      "e.g. rise.num_masks=1000")
  p.add_argument("--no_figures", action="store_true",
                 help="tables only (no method grid or curve plots)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 help="compute dtype of the deletion/insertion forwards "
                      "(default: the run's); with bfloat16 the DAUC/IAUC means "
                      f"stay within {metrics.BF16_AUC_TOLERANCE} of float32")
  args = p.parse_args(argv)
  result = evaluate(
      args.workdir, split=args.split, methods=args.methods, configs=args.config,
      num_images=args.num_images, protocol=args.protocol,
      batch_size=args.batch_size, chunk_size=args.chunk_size,
      mask_key=args.mask_key, reference=args.reference, out_dir=args.out,
      seed=args.seed, options=parse_options(args.option), steps=args.steps,
      pixels_per_step=args.pixels_per_step, tolerance=args.tolerance,
      figures=not args.no_figures, dtype=args.dtype)
  with open(result["paths"]["md"]) as f:
    print("\n" + f.read())
  print("Wrote", ", ".join(str(v) for v in result["paths"].values()))
  return result


if __name__ == "__main__":
  main()
