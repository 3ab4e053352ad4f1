"""Randomisation sanity checks: similarity measures against scipy/numpy
references, which layers each setting re-initialises, and the checks on
maps that ignore the weights, Grad-CAM and the random-logit test."""

import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage, stats

from brnpa_jax.explain import randomisation as rnd
from brnpa_jax.models import Classifier, build_model
from brnpa_jax.train.sharding import make_mesh
from helpers import FAST_PRNG

H, W = 32, 48
NUM_CLASSES = 5


def _model(head, n=3, init=True):
  cfg = ml_collections.ConfigDict(dict(
      backbone="resnet_tiny", width=8, res="high", head=head, num_maps=3,
      refine=True, init="norm", aux_heads=False, dropout=0.0, use_bias=True,
      zero_init_residual=False))
  model = build_model(cfg, NUM_CLASSES)
  if not init:
    return model
  images = jax.random.normal(jax.random.key(1), (n, H, W, 3))
  # On one image, as randomisation_checks re-initialises: one compiled init.
  variables = jax.jit(model.init)(
      jax.random.fold_in(jax.random.key(0, impl=FAST_PRNG), 0), images[:1])
  return model, variables, images


# -- references -------------------------------------------------------------------
def _ssim_reference(a, b, win=7):
  """skimage's structural_similarity (uniform window, sample covariance,
  the mean inside the border), data range = max - min over both (Quantus)."""
  a, b = np.float64(a), np.float64(b)
  r = max(a.max(), b.max()) - min(a.min(), b.min())
  f = lambda x: ndimage.uniform_filter(x, win)
  ux, uy = f(a), f(b)
  cov = win * win / (win * win - 1)
  vx, vy = cov * (f(a * a) - ux * ux), cov * (f(b * b) - uy * uy)
  vxy = cov * (f(a * b) - ux * uy)
  c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
  s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
  p = (win - 1) // 2
  return s[p:-p, p:-p].mean()


def _hog_reference(x, orientations=9, cell=8, block=3):
  """skimage.feature.hog's algorithm with its defaults, with loops."""
  x = np.float64(x)
  gr, gc = np.zeros_like(x), np.zeros_like(x)
  gr[1:-1] = x[2:] - x[:-2]
  gc[:, 1:-1] = x[:, 2:] - x[:, :-2]
  mag = np.hypot(gc, gr)
  ang = np.rad2deg(np.arctan2(gr, gc)) % 180
  nr, nc = x.shape[0] // cell, x.shape[1] // cell
  hist = np.zeros((nr, nc, orientations))
  width = 180 / orientations
  for r in range(nr):
    for c in range(nc):
      m = mag[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
      a = ang[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
      for o in range(orientations):
        inside = (a >= width * o) & (a < width * (o + 1))
        hist[r, c, o] = m[inside].sum() / cell**2
  out = []
  for r in range(nr - block + 1):
    for c in range(nc - block + 1):
      v = hist[r:r + block, c:c + block]
      v = v / np.sqrt(np.sum(v**2) + 1e-10)
      v = np.minimum(v, 0.2)
      out.append(v / np.sqrt(np.sum(v**2) + 1e-10))
  return np.concatenate([v.ravel() for v in out])


def test_similarities_equal_scipy_and_numpy_references():
  rng = np.random.default_rng(2)
  base = rng.normal(size=(3, H, W))
  # Ties (ReLU zeros, rounding) as saliency maps have them; a smooth map.
  a = np.round(np.maximum(base, 0) * 4) / 4
  b = np.round(np.maximum(base + 0.8 * rng.normal(size=(3, H, W)), 0) * 4) / 4
  b[2] = ndimage.zoom(rng.uniform(size=(4, 6)), 8, order=1)
  a, b = np.float32(a), np.float32(b)

  @jax.jit
  def all_of(a, b):
    return (rnd.similarities(a, b), rnd.similarities(b, b),
            jax.vmap(rnd.discrete_entropy)(b), jax.vmap(rnd.hog)(b),
            rnd.spearman(b[0], jnp.zeros_like(b[0])))

  got, same, entropy, hog, constant = all_of(a, b)
  for i in range(3):
    np.testing.assert_allclose(got["spearman"][i],
                               stats.spearmanr(a[i].ravel(), b[i].ravel())[0],
                               atol=1e-5)
    np.testing.assert_allclose(got["ssim"][i], _ssim_reference(a[i], b[i]),
                               atol=1e-5)
    np.testing.assert_allclose(hog[i], _hog_reference(b[i]), atol=1e-5)
    np.testing.assert_allclose(
        got["hog"][i], stats.pearsonr(_hog_reference(a[i]),
                                      _hog_reference(b[i]))[0], atol=1e-5)
    counts, _ = np.histogram(b[i], bins=100)
    np.testing.assert_allclose(entropy[i], stats.entropy(counts), atol=1e-5)
  np.testing.assert_array_equal(got["spearman_abs"], got["spearman"])  # a, b >= 0
  # Equal maps are similar by 1; a constant map has no rank correlation.
  for k in rnd.SIMILARITIES:
    np.testing.assert_allclose(same[k], 1.0, atol=1e-5)
  assert np.isnan(constant)


def test_layers_top_down_and_each_setting_randomises_exactly_its_layers():
  model = _model("bcnn", init=False)
  images = jnp.zeros((1, H, W, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  layers = rnd.layer_order(model, variables, images)
  assert layers == ["classifier", "head", "backbone/layer4_0", "backbone/layer3_0",
                    "backbone/layer2_0", "backbone/layer1_0", "backbone/bn1",
                    "backbone/conv1"]
  fresh = jax.tree.map(lambda x: x + 1.0, variables)  # every leaf differs
  leaf_layers = rnd._leaf_layers(variables, layers)
  assert -1 not in jax.tree.leaves(leaf_layers)
  cascading = rnd.settings("cascading", len(layers))
  independent = rnd.settings("independent", len(layers))
  mixed = jax.jit(lambda v, f, flags: rnd._mixed(v, f, leaf_layers, flags))
  for test, rows in (("cascading", cascading), ("independent", independent)):
    for k, flags in enumerate(rows):
      chosen = set(layers[:k + 1]) if test == "cascading" else {layers[k]}
      got = mixed(variables, fresh, jnp.asarray(flags))
      for (path, value), want, orig in zip(
          jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(fresh),
          jax.tree.leaves(variables)):
        keys = [p.key for p in path[1:]]
        layer = "/".join(keys[:2] if keys[0] == "backbone" else keys[:1])
        # params and batch_stats alike
        np.testing.assert_array_equal(value, want if layer in chosen else orig,
                                      err_msg=f"{test} {k}: {path}")


def _edges(variables, images, labels):
  """A map that ignores the model: the image's gradient magnitude."""
  del variables, labels
  g = images.sum(-1)
  gy, gx = jnp.gradient(g, axis=(1, 2))
  return jnp.hypot(gx, gy)


@pytest.fixture(scope="module")
def gap_checks():
  model, variables, images = _model("gap")
  run = types.SimpleNamespace(model=model, variables=variables)
  labels = jnp.array([0, 3, 1])
  methods = {"edges": _edges, "gradcam": rnd.explainer("gradcam", model),
             "own": rnd.explainer("own", model)}
  # Two devices, two images per call: the second call is padded.
  result = rnd.randomisation_checks(
      run, images, labels, methods, tests=("cascading", "random_logit", "efficient"),
      batch_size=2, mesh=make_mesh(2), rng=jax.random.key(1, impl=FAST_PRNG))
  return model, variables, images, labels, result


def test_a_map_that_ignores_the_weights_stays_and_grad_cam_changes(gap_checks):
  _, _, _, _, result = gap_checks
  assert result["layers"][0] == "classifier"
  n_layers = len(result["layers"])
  for measure in rnd.SIMILARITIES:
    edges = result["cascading"]["edges"][measure]
    assert edges.shape == (n_layers, 3)
    np.testing.assert_allclose(edges, 1.0, atol=1e-5, err_msg=measure)
    np.testing.assert_allclose(result["random_logit"]["edges"][measure], 1.0,
                               atol=1e-5)
  np.testing.assert_allclose(result["efficient"]["edges"]["entropy_rise"], 0.0,
                             atol=1e-6)
  # The GAP model's own map (the feature norms) reads neither the classifier
  # nor the class: equal, and so similar by exactly 1, in all four measures.
  for measure in rnd.SIMILARITIES:
    np.testing.assert_allclose(result["cascading"]["own"][measure][0], 1.0,
                               atol=1e-6, err_msg=measure)
    np.testing.assert_allclose(result["random_logit"]["own"][measure], 1.0,
                               atol=1e-6, err_msg=measure)
  assert np.nanmean(result["cascading"]["own"]["spearman"][-1]) < 0.9
  # Grad-CAM of a randomised model is another map (the whole model: last row).
  grad_cam = result["cascading"]["gradcam"]
  assert np.nanmean(grad_cam["spearman"][-1]) < 0.5
  assert np.nanmean(grad_cam["ssim"][-1]) < 0.5
  assert result["maps"]["gradcam"].shape == (1 + n_layers, 1, H, W)
  rows = rnd.summarise(result)
  row = next(r for r in rows if r["method"] == "edges" and r["measure"] == "ssim"
             and r["test"] == "cascading" and r["layer"] == "classifier")
  assert row["n"] == 3 and abs(row["mean"] - 1) < 1e-5 and row["ci95"] < 1e-5


def test_random_logit_on_a_linear_head_compares_the_two_classes_cams(gap_checks):
  """GAP + linear head: Grad-CAM of class y is ReLU(sum_c W[c, y] A_c)."""
  model, variables, images, labels, result = gap_checks
  other = result["other_labels"]
  assert np.all(other != np.asarray(labels)) and np.all((0 <= other) & (other < 5))
  feats = jax.jit(lambda v, x: model.apply(v, x, method=Classifier.features))(
      variables, images)
  kernel = variables["params"]["classifier"]["kernel"]

  def cam(classes):
    c = jax.nn.relu(jnp.einsum("bhwc,cb->bhw", feats, kernel[:, classes]))
    return np.asarray(jax.image.resize(c, (len(classes), H, W), "bilinear"))

  want, got = cam(np.asarray(labels)), cam(other)
  # An all-zero CAM (no positive evidence) has no ranks to compare.
  defined = [i for i in range(3) if np.ptp(want[i]) > 0 and np.ptp(got[i]) > 0]
  assert len(defined) >= 2, "the test case compares nothing"
  for i in defined:
    np.testing.assert_allclose(
        result["random_logit"]["gradcam"]["spearman"][i],
        stats.spearmanr(want[i].ravel(), got[i].ravel())[0], atol=1e-4)
    # SSIM of the min-max normalised maps (the explainer's output).
    norm = lambda m: (m - m.min()) / (m.max() - m.min())
    np.testing.assert_allclose(result["random_logit"]["gradcam"]["ssim"][i],
                               _ssim_reference(norm(want[i]), norm(got[i])),
                               atol=1e-4)


def test_randomisation_figure(gap_checks, tmp_path):
  _, _, _, _, result = gap_checks
  image = np.full((H, W, 3), 128, np.uint8)
  path = rnd.save_randomisation_figure(str(tmp_path / "rand.png"), image, result)
  assert os.path.getsize(path) > 0
  from PIL import Image
  width, height = Image.open(path).size
  cols, rows = 2 + len(result["layers"]), 3
  assert (width, height) == (round(1.6 * cols * 110),
                             round((1.6 * rows + 0.3) * 110))
