r"""Evaluates trained runs: accuracy and every map metric, own maps and post-hoc.

  python -m brnpa_jax.explain.evaluate --split test --out runs/eval \
      --workdir runs/brnpa --methods own \
      --workdir runs/gap --methods own,gradcam,gradcampp,scorecam,rise \
      --workdir runs/bcnn --methods own

For each ``--workdir`` the best checkpoint is restored with the config the
run was trained with (``brnpa_jax.runs.load_run``). ``--methods`` is given
once (for every run) or once per workdir; ``own`` is the model's own map
(BR-NPA map 1 x norm, bcnn mean of its maps x norm, gap the norm map; see
docs/method.md#own-maps), the others are post-hoc explainers of the class
the model predicts.
``--dtype bfloat16`` runs the deletion and insertion forwards in bfloat16.
``--metrics`` adds Quantus's metric families by name (``explain/suite.py``:
road, faithfulness_correlation, pixel_flipping, region_perturbation,
max_sensitivity, avg_sensitivity, rank_accuracy, mass_accuracy, top_k,
entropy, sparseness; docs/explanations.md), reported like the others.
``--metrics randomisation`` adds the randomisation sanity checks
(``explain/randomisation.py``, the tests of ``--randomisation_tests``) of
every method on the evaluated images, explaining the predicted class;
``randomisation_smooth`` adds the smooth MPRT (``smooth_cascading``). Both
cost one explanation per image, method, test and layer, so neither is a
default: results.md gains a "Randomisation checks" table, results.json its
rows, and ``randomisation.png`` shows the first image's maps as the layers
are randomised.

Per image and per (run, method): accuracy, sparsity, deletion and insertion
AUC (``--protocol release``: feature-map cells, one step per cell;
``standard``: RISE's pixels; ``both``), pointing game and energy pointing game
against ``--ground_truth``: by default the dataset's own (``GROUND_TRUTH``:
the embedded dataset's ``part_mask``, CUB's boxes, ...). With boxes the energy
pointing game follows Score-CAM's protocol (``--energy_protocol box``: only
images whose box covers less than half the image count); with masks it
counts every image (``mask``).
Written to ``--out``: ``results.md``, ``results.csv``, ``results.json`` (means
with 95% t confidence intervals, and the two-sided Wilcoxon signed-rank test
of each row against ``--reference``, paired by image), ``per_image.npz``, the
method grid ``methods_grid.png`` and the mean curves ``curves.png``. The set
is built beside ``--out`` and swapped in whole when complete, so a failed or
interrupted evaluation leaves earlier results as they were; ``--out`` is
checked before any run is restored (``brnpa_jax.outputs``: a folder holding
other files than these is refused).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from brnpa_jax import cli, outputs
from brnpa_jax.data import catalog, input_pipeline
from brnpa_jax.data.normalization import denormalize
from brnpa_jax.errors import ConfigError
from brnpa_jax.explain import faithfulness, metrics, randomisation, suite
from brnpa_jax.explain.explainers import EXPLAINERS
from brnpa_jax.runs import load_run as restore_run
from brnpa_jax.models import build_model

LOWER_IS_BETTER = ("sparsity", "dauc", "dauc_std") + tuple(
    k for k, (_, lower) in suite.COLUMNS.items() if lower)
# The ground truth of the pointing games, per dataset (data.name).
GROUND_TRUTH = {"parts": "part_mask", "caltech_birds2011": "bbox",
                "cars196": "bbox", "stanford_dogs": "bbox",
                "oxford_iiit_pet": "object_mask"}
ENERGY_PROTOCOLS = ("box", "mask")
# What --out holds (replaced as a whole; see the module docstring).
OUTPUT_FILES = ("results.md", "results.csv", "results.json", "per_image.npz",
                "methods_grid.png", "curves.png", "randomisation.png")
METRIC_NAMES = {
    "accuracy": "accuracy", "sparsity": "sparsity", "dauc": "DAUC",
    "iauc": "IAUC", "dauc_std": "DAUC (std.)", "iauc_std": "IAUC (std.)",
    "pointing": "pointing game", "energy": "energy PG",
    **{k: heading for k, (heading, _) in suite.COLUMNS.items()}}
# --metrics names that run randomisation.randomisation_checks, and the tests
# they add (None: those of --randomisation_tests).
RANDOMISATION = {"randomisation": None,
                 "randomisation_smooth": ("smooth_cascading",)}
RANDOMISATION_TESTS = ("cascading", "independent", "random_logit", "efficient")
SMOOTH_SAMPLES = 10  # smooth MPRT's inputs per map (Quantus: 50)
METRIC_CHOICES = (*suite.METRICS, *RANDOMISATION)
RANDOMISATION_COLUMNS = {
    "spearman": "Spearman", "spearman_abs": "abs. Spearman", "ssim": "SSIM",
    "hog": "HOG sim.", "entropy_rise": "entropy rise"}


# -- runs --------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """A restored model: what evaluation needs of one workdir."""
  name: str
  config: Any
  model: Any
  variables: Any
  head: str


def load_run(workdir: str) -> Run:
  """Restores the best checkpoint's weights of ``workdir`` (no optimiser
  state, no training task)."""
  run = restore_run(workdir, checkpoint="best")
  return Run(os.path.basename(run.workdir.path), run.config, run.model,
             run.variables, run.config.model.head)


# -- per-image metrics -------------------------------------------------------------
def own_maps(aux, head: str):
  """(saliency (B, h, w), sparsity (B,)) of a model's own maps
  (docs/method.md#own-maps)."""
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

  def __init__(self, run: Run, protocols, chunk_size: int, ground_truth: str,
               seed: int = 0, options: dict[str, dict[str, Any]] | None = None,
               steps: int | None = None, pixels_per_step: int | None = None,
               tolerance: float = metrics.POINTING_TOLERANCE,
               energy_protocol: str = "mask", dtype: str | None = None,
               metric_names=()):
    self.run, self.protocols = run, tuple(protocols)
    self.metric_names = tuple(metric_names)
    self.ground_truth, self.energy_protocol = ground_truth, energy_protocol
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
    self.faith = faithfulness.Faithfulness(apply_fn, chunk_size=chunk_size)
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

  def explain_fn(self, method: str, rng):
    """``(images, classes) -> saliency`` of a method (for the sensitivities)."""
    if method == "own":
      return lambda x, y: own_maps(self.forward(self.run.variables, x)[1],
                                   self.run.head)[0]
    from brnpa_jax.explain.explainers import explain
    return lambda x, y: explain(method, self.run.model, self.run.variables, x,
                                y, rng=rng, **self.options.get(method, {}))

  def batch(self, batch, methods, n: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-image values of every metric for each method, for the first n
    (real) examples of a batch."""
    images = jnp.asarray(batch["image"])
    logits, aux = self.forward(self.run.variables, images)
    predicted = jnp.argmax(logits, -1)
    correct = np.asarray(predicted == batch["label"], np.float32)[:n]
    cells = aux["norms"].shape[1:]
    masks = batch[self.ground_truth]
    if self.ground_truth == "bbox":  # normalised to the crop -> pixels
      size = images.shape[1:3]
      masks = metrics.box_to_mask(
          np.asarray(masks) * np.array([size[0], size[1], size[0], size[1]]), size)
    coverage = (metrics.BOX_PROTOCOL_MAX_COVERAGE
                if self.energy_protocol == "box" else None)
    out = {}
    for method in methods:
      sal, sparsity, seconds = self.saliency(method, images, predicted, aux)
      values = {"accuracy": correct, "sparsity": sparsity[:n],
                "explain_seconds": np.full(n, seconds / len(images)),
                "pointing": np.asarray(metrics.pointing_game(
                    sal, masks, tolerance=self.tolerance))[:n],
                "energy": np.asarray(metrics.energy_pointing_game(
                    sal, masks, max_coverage=coverage))[:n]}
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
      if self.metric_names:
        self.rng, rng = jax.random.split(self.rng)
        extra = suite.compute(self.metric_names, suite.Inputs(
            self.faith, self.run.variables, images, sal, predicted,
            masks=np.asarray(masks, np.float32),
            explain_fn=self.explain_fn(method, rng), rng=rng))
        values.update({k: v[:n] for k, v in extra.items()})
      values["saliency"] = np.asarray(sal)[:n]
      values["predicted"] = np.asarray(predicted)[:n]
      out[method] = values
    return out


def ground_truth_of(config, ground_truth: str | None) -> str:
  """``ground_truth``, else the dataset's own (``GROUND_TRUTH``)."""
  if ground_truth:
    return ground_truth
  if config.data.name not in GROUND_TRUTH:
    raise ConfigError(f"The {config.data.name!r} dataset has no masks or boxes "
                      "for the pointing games: pass --ground_truth.")
  return GROUND_TRUTH[config.data.name]


def iterate_split(config, split: str, batch_size: int, num_images: int | None,
                  mask_key: str):
  """``(batch, n)`` of a split in order: fixed-shape batches whose first n
  examples are real (at most ``num_images`` in all); the rest is padding,
  kept so that no jitted function sees a new shape."""
  ds = input_pipeline.make_eval_dataset(config.data, split, batch_size=batch_size)
  seen = 0
  for batch in tfds.as_numpy(ds):
    if mask_key not in batch:
      raise ConfigError(f"The {config.data.name!r} dataset has no {mask_key!r}; "
                      f"it has {sorted(batch)}. Choose another --ground_truth.")
    n = int(batch["mask"].sum())  # padding only ever follows real examples
    if num_images is not None:
      n = min(n, num_images - seen)
    if n <= 0:
      break
    seen += n
    yield batch, n


# -- statistics ------------------------------------------------------------------
def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
  """Mean and the half-width of its t confidence interval (0 for n < 2) of
  the finite values (NaN marks an image a protocol leaves out)."""
  from scipy import stats  # scipy comes with jax
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if len(v) < 2:
    return float(v.mean()) if len(v) else float("nan"), 0.0
  sem = v.std(ddof=1) / np.sqrt(len(v))
  return float(v.mean()), float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * sem)


def paired_p(a, b) -> float:
  """Two-sided Wilcoxon signed-rank p-value of paired samples (1.0 when no
  pair differs); pairs with a NaN are left out."""
  from scipy import stats
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  d = d[np.isfinite(d)]
  if len(d) == 0 or not np.any(d != 0):
    return 1.0
  return float(stats.wilcoxon(d).pvalue)


def summarise(per_image: dict[str, dict[str, np.ndarray]], reference: str
              ) -> list[dict[str, Any]]:
  """One dict per (row, metric): n, mean, 95% CI, p-value against reference."""
  if reference not in per_image:
    raise ConfigError(f"--reference {reference!r} is not one of the rows "
                      f"{sorted(per_image)}.")
  out = []
  for row, values in per_image.items():
    for metric in METRIC_NAMES:
      if metric not in values:
        continue
      mean, half = mean_ci(values[metric])
      p = (None if row == reference or metric == "accuracy"
           else paired_p(values[metric], per_image[reference][metric]))
      n = int(np.sum(np.isfinite(np.asarray(values[metric], np.float64))))
      out.append({"row": row, "metric": metric, "n": n,
                  "mean": mean, "ci95": half, "p_vs_reference": p})
  return out


def randomisation_table(rows) -> list[str]:
  """The "Randomisation checks" section of results.md: one line per (run /
  maps, test, layer), a column per measure (``RANDOMISATION_COLUMNS``)."""
  cells: dict[tuple, dict[str, Any]] = {}
  for r in rows:
    cells.setdefault((r["row"], r["test"], r["layer"]), {})[r["measure"]] = r
  measures = [m for m in RANDOMISATION_COLUMNS
              if any(r["measure"] == m for r in rows)]
  head = (["run / maps", "test", "layer", "n"]
          + [RANDOMISATION_COLUMNS[m] for m in measures])
  lines = ["## Randomisation checks", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  first = {r["row"]: i for i, r in reversed(list(enumerate(rows)))}
  for (row, test, layer), by in sorted(cells.items(),
                                       key=lambda c: first[c[0][0]]):
    entries = [row, test, layer or "-", str(min(r["n"] for r in by.values()))]
    entries += [f"{by[m]['mean']:.3f} ± {by[m]['ci95']:.3f}" if m in by else ""
                for m in measures]
    lines.append("| " + " | ".join(entries) + " |")
  return lines + [
      "", "Similarity per image of each map to the original model's map "
      "(random_logit: to the map of the predicted class, on the original "
      "model), means with 95% t confidence intervals; n: the images with a "
      "defined value (a constant map has no rank correlation). cascading: "
      "the layers from the top down to the one named are re-initialised; "
      "independent: that layer only. 1 means unchanged: a map that reads the "
      "weights (or the class) falls. efficient: the relative rise of the "
      "map's entropy when the whole model is re-initialised "
      "(docs/explanations.md#randomisation-checks)."]


def write_tables(summary, per_image, out_dir: str, reference: str,
                 info: dict[str, Any], randomisation_rows=()
                 ) -> dict[str, str]:
  """results.md / .csv / .json and per_image.npz in ``out_dir``; with
  ``randomisation_rows`` (``randomisation.summarise``'s, each with its
  ``row``), their table in results.md and the rows in results.json."""
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
                   for row, v in per_image.items()},
               **({"randomisation": list(randomisation_rows)}
                  if randomisation_rows else {})}, f, indent=2)
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
  energy_n = [s["n"] for s in summary if s["metric"] == "energy"]
  protocol = (f"Score-CAM's box protocol: the {energy_n[0] if energy_n else 0} "
              f"of {n} images whose box covers less than half the image"
              if info.get("energy_protocol") == "box" else "every image")
  lines += ["", f"Means over {n} images with 95% t confidence intervals; * marks "
            f"a row that differs from {reference} (two-sided Wilcoxon "
            "signed-rank test paired by image, p < 0.05). Pointing games "
            f"against {info.get('ground_truth')}; energy pointing game: "
            f"{protocol}."]
  if randomisation_rows:
    lines += [""] + randomisation_table(randomisation_rows)
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
    raise ConfigError(f"{flag} is given {len(values)} times for {len(workdirs)} "
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
      raise ConfigError(f"--option {item!r}: expected METHOD.NAME=VALUE, e.g. "
                        "rise.num_masks=1000.")
    if name not in options_of(method):
      raise ConfigError(f"--option {item!r}: {method} takes "
                        f"{sorted(options_of(method))}.")
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value  # a bare string such as baseline=black
    out.setdefault(method, {})[name] = parsed
  return out


def evaluate(workdirs, *, split="test", methods=None, num_images=None, protocol="release", batch_size=50,
             chunk_size=64, ground_truth=None, energy_protocol=None,
             reference=None, out_dir,
             seed=0, options=None, steps=None, pixels_per_step=None,
             tolerance=metrics.POINTING_TOLERANCE, figures=True, dtype=None,
             metric_names=(), randomisation_tests=RANDOMISATION_TESTS
             ) -> dict[str, Any]:
  """Evaluates runs and writes the tables; returns the summary and paths."""
  methods = [m.split(",") for m in _per_workdir(methods, workdirs, "--methods", "own")]
  protocols = ("release", "standard") if protocol == "both" else (protocol,)
  tests = tuple(dict.fromkeys(
      t for name in metric_names if name in RANDOMISATION
      for t in RANDOMISATION[name] or randomisation_tests))
  asked, metric_names = list(metric_names), tuple(
      m for m in metric_names if m not in RANDOMISATION)
  with outputs.replace_folder(out_dir, OUTPUT_FILES) as staging:
    per_image: dict[str, dict[str, list]] = {}
    examples, t0 = None, time.time()
    checked, checked_rows = [], []  # randomisation: (run, image, result)
    for workdir, run_methods in zip(workdirs, methods):
      run = load_run(workdir)
      key = ground_truth_of(run.config, ground_truth)
      energy = energy_protocol or ("box" if key == "bbox" else "mask")
      if energy not in ENERGY_PROTOCOLS:
        raise ConfigError(f"--energy_protocol={energy!r}: use one of "
                          f"{ENERGY_PROTOCOLS}.")
      evaluator = Evaluator(run, protocols, chunk_size, key, seed, options,
                            steps, pixels_per_step, tolerance, energy, dtype,
                            metric_names)
      run_images, run_predicted = [], []
      for batch, n in iterate_split(run.config, split, batch_size, num_images,
                                    key):
        if examples is None:
          examples = {k: v[:n] for k, v in batch.items()}
        for method, values in evaluator.batch(batch, run_methods, n).items():
          row = per_image.setdefault(f"{run.name}/{method}", {})
          for k, v in values.items():
            row.setdefault(k, []).append(v)
        if tests:
          run_images.append(batch["image"][:n])
          run_predicted.append(values["predicted"])
      if tests and run_images:
        images = np.concatenate(run_images)
        result = randomisation.randomisation_checks(
            run, images, np.concatenate(run_predicted), run_methods,
            options=options, tests=tests, seed=seed, batch_size=batch_size,
            smooth_samples=SMOOTH_SAMPLES)
        checked_rows += [{"row": f"{run.name}/{r['method']}", **r}
                         for r in randomisation.summarise(result)]
        if result["maps"]:
          checked.append((run.name, denormalize(images[:1])[0], result))
      print(f"{run.name}: {', '.join(run_methods)} done "
            f"({time.time() - t0:.0f} s so far)", flush=True)
    if examples is None:
      raise ConfigError(f"No examples in split {split!r}.")
    per_image = {row: {k: np.concatenate(v) for k, v in vals.items()}
                 for row, vals in per_image.items()}
    reference = reference or next(iter(per_image))
    summary = summarise(per_image, reference)
    info = {"workdirs": list(workdirs), "split": split, "protocols": protocols,
            "num_images": len(next(iter(per_image.values()))["accuracy"]),
            "ground_truth": key, "energy_protocol": energy,
            "seconds": time.time() - t0,
            "options": options or {}, "release_steps": steps or "one per cell",
            "pixels_per_step": pixels_per_step or "image width",
            "pointing_tolerance_px": tolerance,
            "perturbation_dtype": dtype or "the run's",
            "metrics": asked,
            **({"randomisation": {
                "tests": list(tests), "seed": seed,
                "smooth_samples": (SMOOTH_SAMPLES if "smooth_cascading"
                                   in tests else None),
                "layers": {name: r["layers"] for name, _, r in checked}}}
               if tests else {}),
            "metric_settings": {k: list(v) if isinstance(v, tuple) else v
                                for k, v in suite.SETTINGS.items()},
            "ci": "95% t interval", "paired_test": "two-sided Wilcoxon signed-rank"}
    with outputs.naming(out_dir):
      paths = write_tables(summary, per_image, staging, reference, info,
                           checked_rows)
      if figures:
        paths["figures"] = write_figures(examples, per_image, staging)
        if checked:
          paths["figures"].append(randomisation.save_randomisation_figures(
              os.path.join(staging, "randomisation.png"), checked))
  paths = outputs.moved(paths, staging, out_dir)
  return {"summary": summary, "paths": paths, "info": info}


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  d = lambda kind, name, default, text, **kw: getattr(flags, f"DEFINE_{kind}")(
      name, default, text, flag_values=fv, **kw)
  d("multi_string", "workdir", None, "A run's workdir; repeat for several runs.")
  d("multi_string", "methods", None, "Comma-separated: own and explainers; once, "
    "or once per --workdir (default: own).")
  d("string", "split", "test", "The split to evaluate: "
    f"{', '.join(catalog.SPLITS)}, or a slice such as test[:100].")
  d("string", "out", None, "Folder for tables and figures.")
  d("integer", "num_images", None, "The first N examples (default: all).",
    lower_bound=1)
  flags.DEFINE_enum("protocol", "release", ["release", "standard", "both"],
                    "Deletion/insertion protocol.", flag_values=fv)
  d("integer", "steps", None, "Release protocol steps (default: one per cell; "
    "the paper also uses 196).", lower_bound=1)
  d("integer", "pixels_per_step", None, "Standard protocol (default: the image "
    "width, 224 on 224x224).", lower_bound=1)
  d("integer", "batch_size", 50, "Images per batch.", lower_bound=1)
  d("integer", "chunk_size", 64, "Perturbed images per forward in "
    "deletion/insertion.", lower_bound=1)
  d("float", "tolerance", metrics.POINTING_TOLERANCE, "Pointing game tolerance "
    "in pixels.", lower_bound=0)
  d("string", "ground_truth", None, "Ground truth of the pointing games: a "
    "mask key (part_mask, object_mask) or bbox (default: the dataset's, "
    "GROUND_TRUTH).")
  d("string", "energy_protocol", None, "box: Score-CAM's (images whose box "
    "covers < 50%); mask: every image (default: box for boxes, else mask).")
  d("string", "reference", None, "Row of the paired tests (default: the first, "
    "e.g. brnpa/own).")
  d("integer", "seed", 0, "Seed of the random explainers.")
  d("multi_string", "option", None, "An explainer option METHOD.NAME=VALUE "
    "(repeatable), e.g. rise.num_masks=1000.")
  d("bool", "figures", True, "Also draw the method grid and the curves.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype of "
                    "the deletion/insertion forwards (default: the run's); with "
                    "bfloat16 the DAUC/IAUC means stay within "
                    f"{metrics.BF16_AUC_TOLERANCE} of float32.", flag_values=fv)
  d("list", "metrics", [], "Comma-separated Quantus-family metrics to add: "
    f"{', '.join(METRIC_CHOICES)}. randomisation (the tests of "
    "--randomisation_tests) and randomisation_smooth (smooth MPRT, "
    f"{SMOOTH_SAMPLES} inputs per map) are costly: one explanation per image, "
    "method, test and layer (ResNet-18, 11 layers: 24 per image and method "
    f"for the default tests; the smooth one {SMOOTH_SAMPLES * 12} more).")
  d("list", "randomisation_tests", list(RANDOMISATION_TESTS), "The tests of "
    "--metrics randomisation: " + ", ".join(RANDOMISATION_TESTS) + ".")
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)
  # Checked while parsing, before a run is restored or --out is touched.
  flags.register_validator("methods", _check_methods, flag_values=fv)
  flags.register_validator("split", _check_split, flag_values=fv)
  flags.register_validator("metrics", _check_metrics, flag_values=fv)
  flags.register_validator("randomisation_tests", _check_randomisation_tests,
                           flag_values=fv)


def _check_methods(values) -> bool:
  unknown = sorted({m for v in values or () for m in v.split(",")}
                   - set(EXPLAINERS))
  if unknown:
    raise flags.ValidationError(f"unknown method(s) {unknown}; valid: "
                                f"{', '.join(EXPLAINERS)}.")
  return True


def _check_metrics(names) -> bool:
  unknown = [n for n in suite.check(names or ()) if n not in RANDOMISATION]
  if unknown:
    raise flags.ValidationError(f"unknown metric(s) {unknown}; valid: "
                                f"{', '.join(METRIC_CHOICES)}.")
  return True


def _check_randomisation_tests(names) -> bool:
  unknown = [n for n in names or () if n not in RANDOMISATION_TESTS]
  if unknown:
    raise flags.ValidationError(f"unknown test(s) {unknown}; valid: "
                                f"{', '.join(RANDOMISATION_TESTS)}.")
  return True


def _check_split(split: str) -> bool:
  unknown = [n for n in catalog.split_names(split) if n not in catalog.SPLITS]
  if unknown:
    raise flags.ValidationError(f"unknown split {unknown[0]!r}; valid: "
                                f"{', '.join(catalog.SPLITS)}, or a slice "
                                "such as test[:100].")
  return True


def _main(fv: flags.FlagValues) -> dict[str, Any]:
  result = evaluate(
      fv.workdir, split=fv.split, methods=fv.methods, num_images=fv.num_images,
      protocol=fv.protocol, batch_size=fv.batch_size, chunk_size=fv.chunk_size,
      ground_truth=fv.ground_truth, energy_protocol=fv.energy_protocol,
      reference=fv.reference, out_dir=fv.out,
      seed=fv.seed, options=parse_options(fv.option), steps=fv.steps,
      pixels_per_step=fv.pixels_per_step, tolerance=fv.tolerance,
      figures=fv.figures, dtype=fv.dtype, metric_names=fv.metrics,
      randomisation_tests=fv.randomisation_tests)
  with open(result["paths"]["md"]) as f:
    print("\n" + f.read())
  print("Wrote", ", ".join(str(v) for v in result["paths"].values()))


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; see the module docstring."""
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.explain.evaluate")


if __name__ == "__main__":
  raise SystemExit(main())
