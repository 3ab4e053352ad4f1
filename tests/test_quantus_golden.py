"""Our Quantus-family metrics equal Quantus 0.6.0's values.

tests/golden/quantus_metrics.npz holds the inputs (the converted resnet_tiny,
4 images of 32x32, maps, masks) and Quantus's values, written by
``python -m brnpa_jax.tools.xai_golden`` in an environment with Quantus and
PyTorch; this test needs neither. Quantus's random draws were seeded: the same
subsets and noise Quantus drew were recorded (ROAD's noise is drawn again
here from its seeds with numpy's legacy ``RandomState``) and are passed to
our functions explicitly. Tolerances are stated per metric (float32
forwards against PyTorch's; float64 arithmetic in Quantus).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brnpa_jax.explain import (complexity, faithfulness, imputation,
                               localisation, robustness)
from brnpa_jax.models import weights
from brnpa_jax.tools import xai_golden
from brnpa_jax.tools.weights_golden import random_state_dict
from helpers import abstract_variables, weights_model

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden",
                      "quantus_metrics.npz")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def model():
  net = weights_model(xai_golden.ARCH, num_classes=xai_golden.CLASSES)
  flat = weights.torch_to_flat(random_state_dict(
      xai_golden.ARCH, xai_golden.CLASSES, seed=xai_golden.WEIGHT_SEED))
  variables = weights.load_pretrained(abstract_variables(net, 32), flat)
  apply_fn = lambda v, x: net.apply(v, x, train=False)[0]
  return apply_fn, variables


@pytest.fixture(scope="module")
def faith(model):
  return faithfulness.Faithfulness(model[0], chunk_size=64)


def test_inputs_and_versions(golden):
  assert json.loads(str(golden["quantus/versions"]))["quantus"] == "0.6.0"
  np.testing.assert_array_equal(golden["maps"], xai_golden.golden_inputs()["maps"])
  # Quantus 0.6.0's own ROAD fails on 3-channel images (docs/explanations.md).
  assert str(golden["quantus/quantus_road_error"]).startswith("IndexError")


def test_complexity(golden):
  np.testing.assert_allclose(complexity.entropy(golden["maps"]),
                             golden["quantus/entropy"], rtol=1e-6)
  np.testing.assert_allclose(complexity.sparseness(golden["maps"]),
                             golden["quantus/sparseness"], rtol=0, atol=1e-5)


def test_localisation(golden):
  maps, masks = golden["maps"], golden["masks"]
  np.testing.assert_allclose(
      localisation.relevance_rank_accuracy(maps, masks),
      golden["quantus/rank_accuracy"], rtol=0, atol=1e-7)
  np.testing.assert_allclose(
      localisation.relevance_mass_accuracy(maps, masks),
      golden["quantus/mass_accuracy"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(localisation.top_k_intersection(maps, masks),
                             golden["quantus/top_k"], rtol=0, atol=1e-7)
  np.testing.assert_allclose(
      localisation.top_k_intersection(maps, masks, k=100, concept_influence=True),
      golden["quantus/top_k_100_ci"], rtol=1e-6)


def test_faithfulness_correlation(golden, faith, model):
  b = golden["images"].shape[0]
  draws = golden["quantus/faithfulness_correlation/draws"]  # run, then image
  subsets = draws.reshape(-1, b, draws.shape[-1]).transpose(1, 0, 2)
  ours = faith.faithfulness_correlation(
      model[1], golden["images"], golden["maps"], golden["quantus/labels"],
      subsets_BxRxS=subsets)
  np.testing.assert_allclose(ours, golden["quantus/faithfulness_correlation"],
                             rtol=0, atol=2e-3)


def test_pixel_flipping(golden, faith, model):
  ours = faith.pixel_flipping(model[1], golden["images"], golden["maps"],
                              golden["quantus/labels"], features_in_step=16)
  ref = golden["quantus/pixel_flipping_16"]
  assert ours.shape == ref.shape
  # Every third step ends on a whole pixel: the same features are set there
  # whatever the order among a pixel's channels (ties in Quantus's sort).
  np.testing.assert_allclose(ours[:, 2::3], ref[:, 2::3], rtol=0, atol=1e-5)


def test_region_perturbation(golden, faith, model):
  args = (model[1], golden["images"], golden["maps"], golden["quantus/labels"])
  np.testing.assert_allclose(faith.region_perturbation(*args, patch_size=8),
                             golden["quantus/region_perturbation_8"],
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(
      faith.region_perturbation(*args, patch_size=6, order="lerf"),
      golden["quantus/region_perturbation_6_lerf"], rtol=0, atol=1e-5)


def test_imputation_equals_quantus(golden):
  x, a = golden["images"][0], golden["maps"][0]
  removed = np.zeros(a.size, bool)
  removed[np.argsort(-a.reshape(-1), kind="stable")[:a.size // 2]] = True
  ours = imputation.impute(x[None], removed.reshape(1, *a.shape))[0]
  # CG to a relative residual of 1e-5 (imputation.TOL) against a direct solve.
  np.testing.assert_allclose(ours, golden["quantus/imputation_50"].transpose(1, 2, 0),
                             rtol=0, atol=5e-5)


def test_road(golden, faith, model):
  b, h, w, c = golden["images"].shape
  pcts, sigma = xai_golden.ROAD["percentages"], xai_golden.ROAD["noise"]
  for order in ("morf", "lerf"):
    a = golden["maps"].reshape(b, -1)
    ranked = np.argsort(-a if order == "morf" else a, axis=1, kind="stable")
    noise = np.zeros((b, len(pcts), h * w, c), np.float32)
    for i in range(b):
      for j, p in enumerate(pcts):
        k = int(h * w * p / 100)
        z = np.random.RandomState(xai_golden.ROAD["seed"] + 1000 * i + j).randn(c, k)
        noise[i, j, ranked[i, :k]] = sigma * z.T
    ours = faith.road(model[1], golden["images"], golden["maps"],
                      golden["quantus/labels"], percentages=pcts, order=order,
                      noise_BxPxHxWxC=noise.reshape(b, len(pcts), h, w, c))
    np.testing.assert_array_equal(ours, golden[f"quantus/road_{order}"])


def test_sensitivity(golden, model):
  apply_fn, variables = model
  images = golden["images"]
  b, h, w, c = images.shape

  @jax.jit
  def explain(x, y):  # the input gradient of the class logit, summed over channels
    grad = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(
        apply_fn(variables, x), y[:, None], 1)))(x)
    return grad.sum(-1)

  for name, reduce in (("max", robustness.max_sensitivity),
                       ("avg", robustness.avg_sensitivity)):
    draws = golden[f"quantus/{name}_sensitivity/draws"]  # (N, B, C*H*W)
    noise = draws.reshape(-1, b, c, h, w).transpose(0, 1, 3, 4, 2)
    ratios = robustness.sensitivity_ratios(explain, images,
                                           golden["quantus/labels"],
                                           noise_NxBxHxWxC=noise)
    np.testing.assert_allclose(reduce(ratios), golden[f"quantus/{name}_sensitivity"],
                               rtol=1e-4)
