"""Quantus-family metrics by name, for ``evaluate --metrics`` (docs/explanations.md).

``METRICS`` maps a name to a batched function of one ``Inputs`` (a batch of
images with their maps) that returns per-image columns; ``COLUMNS`` names
each column for the tables and says whether lower is better. ``SETTINGS``
are the defaults ``evaluate`` uses: Quantus's, except where Quantus's would
cost one forward per feature (pixel flipping: one row of pixels per step) or
200 explanations per image (sensitivities: 10 draws).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from brnpa_jax.explain import (complexity, faithfulness, localisation, metrics,
                               robustness)

SETTINGS = {
    "road_percentages": faithfulness.ROAD_PERCENTAGES,
    "road_noise": faithfulness.ROAD_NOISE,
    "fc_runs": faithfulness.FC_RUNS, "fc_subset": faithfulness.FC_SUBSET,
    "pixels_per_flip_step": None,  # None: one row of pixels (all channels)
    "patch_size": faithfulness.PATCH_SIZE, "regions": faithfulness.REGIONS,
    "sensitivity_samples": 10, "sensitivity_radius": robustness.RADIUS,
    "top_k": localisation.TOP_K,
}


@dataclasses.dataclass
class Inputs:
  """A batch as the metrics read it.

  Attributes:
    faith: the ``faithfulness.Faithfulness`` of the model function.
    variables: model variables.
    images: (B, H, W, 3) model inputs.
    saliency: (B, h, w) maps (upsampled to H x W where a metric needs it).
    classes: (B,) the class explained and tracked.
    masks: (B, H, W) ground truth, or None.
    explain_fn: ``(images, classes) -> maps`` for the sensitivities.
    rng: key of the random draws.
    settings: ``SETTINGS`` with the user's changes.
  """
  faith: faithfulness.Faithfulness
  variables: Any
  images: Any
  saliency: Any
  classes: Any
  masks: Any = None
  explain_fn: Callable | None = None
  rng: Any = None
  settings: dict = dataclasses.field(default_factory=lambda: dict(SETTINGS))
  _cache: dict = dataclasses.field(default_factory=dict)

  @property
  def maps(self):
    """The saliency at the input resolution (bilinear)."""
    if "maps" not in self._cache:
      size = self.images.shape[1:3]
      sal = np.asarray(self.saliency, np.float32)
      self._cache["maps"] = (sal if sal.shape[1:] == size
                             else metrics.upsample(sal, size))
    return self._cache["maps"]

  def key(self, name: str):
    base = self.rng if self.rng is not None else jax.random.key(0)
    return jax.random.fold_in(base, sum(map(ord, name)))

  def args(self):
    return self.variables, self.images, self.maps, self.classes


def _road(x: Inputs):
  s = x.settings
  out = {}
  for order in ("morf", "lerf"):
    curve = x.faith.road(*x.args(), percentages=s["road_percentages"],
                         order=order, noise=s["road_noise"],
                         rng=x.key(f"road_{order}"))
    out[f"road_{order}"] = faithfulness.curve_area(curve)
  return out


def _faithfulness_correlation(x: Inputs):
  s = x.settings
  return {"faithfulness_correlation": x.faith.faithfulness_correlation(
      *x.args(), runs=s["fc_runs"], subset=s["fc_subset"], rng=x.key("fc"))}


def _pixel_flipping(x: Inputs):
  _, h, w, c = x.images.shape
  per_step = x.settings["pixels_per_flip_step"] or w
  curve = x.faith.pixel_flipping(*x.args(), features_in_step=per_step * c)
  return {"pixel_flipping": metrics.trapezoid_auc(curve)}


def _region_perturbation(x: Inputs):
  s = x.settings
  curve = x.faith.region_perturbation(*x.args(), patch_size=s["patch_size"],
                                      regions=s["regions"])
  return {"region_perturbation": faithfulness.curve_area(curve)}


def _ratios(x: Inputs):
  if "ratios" not in x._cache:
    if x.explain_fn is None:
      raise ValueError("the sensitivities need an explain_fn.")
    s = x.settings
    x._cache["ratios"] = robustness.sensitivity_ratios(
        x.explain_fn, x.images, x.classes, x.saliency,
        radius=s["sensitivity_radius"], samples=s["sensitivity_samples"],
        rng=x.key("sensitivity"))
  return x._cache["ratios"]


def _masks(x: Inputs):
  if x.masks is None:
    raise ValueError("the localisation metrics need masks.")
  return x.maps, x.masks


METRICS: dict[str, Callable[[Inputs], dict[str, np.ndarray]]] = {
    "road": _road,
    "faithfulness_correlation": _faithfulness_correlation,
    "pixel_flipping": _pixel_flipping,
    "region_perturbation": _region_perturbation,
    "max_sensitivity": lambda x: {
        "max_sensitivity": robustness.max_sensitivity(_ratios(x))},
    "avg_sensitivity": lambda x: {
        "avg_sensitivity": robustness.avg_sensitivity(_ratios(x))},
    "rank_accuracy": lambda x: {"rank_accuracy": np.asarray(
        localisation.relevance_rank_accuracy(*_masks(x)))},
    "mass_accuracy": lambda x: {"mass_accuracy": np.asarray(
        localisation.relevance_mass_accuracy(*_masks(x)))},
    "top_k": lambda x: {"top_k": np.asarray(localisation.top_k_intersection(
        *_masks(x), k=min(x.settings["top_k"], x.maps.shape[1] * x.maps.shape[2])))},
    "entropy": lambda x: {"entropy": np.asarray(complexity.entropy(x.maps))},
    "sparseness": lambda x: {"sparseness": np.asarray(complexity.sparseness(x.maps))},
}

# column -> (table heading, lower is better)
COLUMNS = {
    "road_morf": ("ROAD MoRF", True), "road_lerf": ("ROAD LeRF", False),
    "faithfulness_correlation": ("faithfulness corr.", False),
    "pixel_flipping": ("pixel flipping AUC", True),
    "region_perturbation": ("region pert. AOPC", False),
    "max_sensitivity": ("max-sensitivity", True),
    "avg_sensitivity": ("avg-sensitivity", True),
    "rank_accuracy": ("rank accuracy", False),
    "mass_accuracy": ("mass accuracy", False),
    "top_k": ("top-k intersection", False),
    "entropy": ("entropy", True), "sparseness": ("Gini sparseness", False),
}


def compute(names, inputs: Inputs) -> dict[str, np.ndarray]:
  """Per-image columns of the named metrics, for one batch."""
  out = {}
  for name in names:
    out.update({k: np.asarray(v) for k, v in METRICS[name](inputs).items()})
  return out


def check(names) -> list[str]:
  """The names that are not metrics (empty when all are)."""
  return [n for n in names if n not in METRICS]
