"""Post-hoc explainers: analytic cases, completeness, shapes and ranges."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from brnpa_jax.explain import explainers as ex
from brnpa_jax.models import Classifier, GAPHead, build_model
from brnpa_jax.models.vit import ViTTest
from helpers import FAST_PRNG

B, H, W = 2, 32, 48  # non-square on purpose
NUM_CLASSES = 5
# Small option values so that every method compiles and runs in seconds.
FAST = {"rise": dict(num_masks=48, chunk=16), "smoothgrad": dict(num_samples=6),
        "integrated_gradients": dict(steps=8), "scorecam": dict(chunk=32),
        "ablationcam": dict(chunk=24)}


def _model(head, backbone="resnet_tiny"):
  cfg = ml_collections.ConfigDict(dict(
      backbone=backbone, width=8, res="high", head=head, num_maps=3,
      refine=True, init="norm", aux_heads=False, dropout=0.0, use_bias=True,
      zero_init_residual=False))
  model = build_model(cfg, NUM_CLASSES)
  images = jax.random.normal(jax.random.key(1), (B, H, W, 3))
  variables = jax.jit(model.init)(jax.random.key(0, impl=FAST_PRNG), images)
  return model, variables, images


@pytest.fixture(scope="module")
def gap():
  return _model("gap")


def _minmax(m):
  m = np.asarray(m, np.float64)
  lo = m.min(axis=(1, 2), keepdims=True)
  span = m.max(axis=(1, 2), keepdims=True) - lo
  assert np.all(span > 0), "a test case with a constant map tests nothing"
  return (m - lo) / span


def _linear_cam(model, variables, images, weights_BxC):
  """ReLU(sum_c weights_c A_c), upsampled and normalised, computed directly."""
  feats = model.apply(variables, images, method=Classifier.features)
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feats, weights_BxC))
  return _minmax(jax.image.resize(cam, (B, H, W), "bilinear"))


def test_split_model_equals_call(gap):
  model, variables, images = gap

  @jax.jit  # one compiled program, not op-by-op dispatch
  def both(images):
    feats = model.apply(variables, images, method=Classifier.features)
    return (model.apply(variables, images),
            model.apply(variables, feats, method=Classifier.classify_features))

  (logits, aux), (logits2, aux2) = both(images)
  np.testing.assert_array_equal(logits, logits2)
  np.testing.assert_array_equal(aux["norms"], aux2["norms"])


def test_grad_cam_on_linear_head_is_the_analytic_cam(gap):
  model, variables, images = gap
  kernel_CxN = variables["params"]["classifier"]["kernel"]
  feats = model.apply(variables, images, method=Classifier.features)
  # Per image the class whose CAM has the most positive mass (not all zero).
  mass = jax.nn.relu(jnp.einsum("bhwc,cn->bnhw", feats, kernel_CxN)).sum((2, 3))
  labels = jnp.argmax(mass, -1)
  expected = _linear_cam(model, variables, images, kernel_CxN[:, labels].T)
  got = ex.explain("gradcam", model, variables, images, labels)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # labels=None explains the predicted class.
  pred = jnp.argmax(model.apply(variables, images)[0], -1)
  np.testing.assert_allclose(
      ex.explain("gradcam", model, variables, images),
      _linear_cam(model, variables, images, kernel_CxN[:, pred].T), atol=1e-5)


def test_ablation_cam_on_linear_head_weights_are_logit_drops(gap):
  # Zeroing channel c of a GAP + linear head drops logit y by W[c, y] mean(A_c).
  model, variables, images = gap
  kernel_CxN = variables["params"]["classifier"]["kernel"]
  feats = model.apply(variables, images, method=Classifier.features)
  labels = jnp.argmax(jnp.einsum("bhwc,cn->bn", feats, kernel_CxN), -1)
  drops = kernel_CxN[:, labels].T * feats.mean(axis=(1, 2))
  got = ex.explain("ablationcam", model, variables, images, labels,
                   **FAST["ablationcam"])
  np.testing.assert_allclose(got, _linear_cam(model, variables, images, drops),
                             atol=1e-4)


def test_grad_cam_pp_on_linear_head_is_its_closed_form(gap):
  """GAP + linear head: d logit_y / d A_c(i, j) = g_c = W[c, y] / (h w) at
  every position. Then alpha_c = g^2 / (2 g^2 + sum_ij(A_c) g^3)
  = 1 / (2 + W[c, y] mean(A_c)) where g > 0 (0 where g = 0), and
  w_c = sum_ij alpha_c ReLU(g_c) = ReLU(W[c, y]) / (2 + W[c, y] mean(A_c))."""
  model, variables, images = gap
  kernel_CxN = variables["params"]["classifier"]["kernel"]
  feats = model.apply(variables, images, method=Classifier.features)
  labels = jnp.array([1, 3])
  w = kernel_CxN[:, labels].T  # (B, C)
  weights = jnp.where(w > 0, w / (2 + w * feats.mean(axis=(1, 2))), 0.0)
  got = ex.explain("gradcampp", model, variables, images, labels)
  np.testing.assert_allclose(got, _linear_cam(model, variables, images, weights),
                             atol=1e-5)


class _Pixels(nn.Module):
  """A backbone whose features are the ReLU of the image itself (C = 3, at
  the input resolution): every perturbation's effect is then analytic."""
  nonnegative_features = True

  def __call__(self, images, train=False):
    del train
    return jax.nn.relu(images)


@pytest.fixture(scope="module")
def pixels():
  """The pixel backbone + GAP + linear head on images with |x| >= 1."""
  model = Classifier(backbone=_Pixels(), head=GAPHead(), num_classes=NUM_CLASSES)
  rng = np.random.default_rng(2)
  images = (rng.choice([-1.0, 1.0], (B, H, W, 3)) * rng.uniform(1, 2, (B, H, W, 3))
            ).astype(np.float32)
  variables = model.init(jax.random.key(0), images)
  return model, variables, jnp.asarray(images), jnp.array([2, 0])


def test_score_cam_on_the_pixel_model_is_its_closed_form(pixels):
  """Features A_c = ReLU(x_c) at the input size, so mask c is
  M_c = (A_c - min A_c) / (max A_c - min A_c) >= 0 and the masked image's
  features are ReLU(x_c' M_c) = A_c' M_c: its logit is
  s_c = sum_c' W[c', y] mean(A_c' M_c) + b_y, and the CAM is
  ReLU(sum_c softmax(s)_c A_c)."""
  model, variables, images, labels = pixels
  kernel, bias = (np.asarray(variables["params"]["classifier"][k], np.float64)
                  for k in ("kernel", "bias"))
  a = np.maximum(np.asarray(images, np.float64), 0)  # (B, H, W, C)
  lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
  masks = (a - lo) / (hi - lo)
  # s[b, c] = sum_c' W[c', y_b] mean_ij(A[b, :, :, c'] M[b, :, :, c]) + b_y.
  s = np.einsum("bijd,bijc,db->bc", a, masks, kernel[:, labels]) / (H * W)
  s += bias[labels][:, None]
  weights = np.exp(s - s.max(1, keepdims=True))
  weights /= weights.sum(1, keepdims=True)
  want = _minmax(np.einsum("bijc,bc->bij", a, weights))
  got = ex.explain("scorecam", model, variables, images, labels, chunk=2)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("magnitude,power", [("abs", 1), ("square", 2)])
def test_smoothgrad_on_the_pixel_model_is_its_closed_form(pixels, magnitude,
                                                          power):
  """d logit_y / d x_c(i, j) = W[c, y] / (H W) where x_c(i, j) > 0, else 0.
  Noise of 1% of the image's range (at most 0.04) cannot flip a sign where
  |x| >= 1, so every noisy copy has that gradient: the map is
  sum_c |W[c, y]|^power [x_c > 0], up to the (H W)^power the min-max scaling
  removes."""
  model, variables, images, labels = pixels
  kernel = np.asarray(variables["params"]["classifier"]["kernel"], np.float64)
  want = _minmax(np.einsum("bijc,bc->bij", (np.asarray(images) > 0),
                           np.abs(kernel[:, labels].T) ** power))
  got = ex.explain("smoothgrad", model, variables, images, labels, sigma=0.01,
                   magnitude=magnitude, num_samples=4, chunk=2)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_integrated_gradients_completeness(gap):
  model, variables, images = gap
  labels = jnp.array([2, 0])
  baseline = jnp.zeros_like(images)
  attr = ex.explain("integrated_gradients", model, variables, images, labels,
                    baseline=np.zeros(images.shape, np.float32), steps=64,
                    chunk=65, raw=True)
  logits = lambda x: model.apply(variables, x)[0][jnp.arange(B), labels]
  gap_f = np.asarray(logits(images) - logits(baseline))
  total = np.asarray(attr).sum(axis=(1, 2))
  assert np.all(np.abs(gap_f) > 1e-3)
  np.testing.assert_allclose(total, gap_f, rtol=0.01)


@pytest.mark.parametrize("method", sorted(set(ex.EXPLAINERS) - {"rollout"}))
def test_every_method_shape_range_and_constant_input(gap, method):
  """Every method on a real backbone (the analytic cases above use the
  linear head and the pixel model)."""
  model, variables, images = gap
  opts = FAST.get(method, {})
  maps = np.asarray(ex.explain(method, model, variables, images, **opts))
  assert maps.shape == (B, H, W) and maps.dtype == np.float32
  assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
  assert np.allclose(maps.max(axis=(1, 2)), 1, atol=1e-6)  # informative maps
  const = ex.explain(method, model, variables, jnp.zeros_like(images), **opts)
  assert np.isfinite(np.asarray(const)).all()
  assert float(const.min()) >= 0 and float(const.max()) <= 1


def test_own_saliency_per_head():
  aux = {"maps": jnp.stack([jnp.eye(4), jnp.ones((4, 4))])[None],
         "norms": jnp.arange(16.0).reshape(1, 4, 4)}
  np.testing.assert_allclose(ex.own_saliency(aux, "brnpa"),
                             _minmax(np.eye(4)[None] * aux["norms"]), atol=1e-6)
  np.testing.assert_allclose(ex.own_saliency(aux, "gap"),
                             _minmax(aux["norms"]), atol=1e-6)
  bcnn = (np.eye(4) + 1)[None] / 2 * aux["norms"]
  np.testing.assert_allclose(ex.own_saliency(aux, "bcnn"), _minmax(bcnn),
                             atol=1e-6)


def test_normalize_constant_and_nan_maps_are_zero():
  maps = jnp.stack([jnp.full((3, 3), 7.0), jnp.full((3, 3), jnp.nan)])
  np.testing.assert_array_equal(ex.normalize_maps(maps), 0.0)


def test_rise_masks_do_not_depend_on_chunking():
  rng = jax.random.key(3)
  masks = jax.jit(ex.rise_masks, static_argnums=2)
  whole = masks(rng, jnp.arange(6), (20, 30))
  part = masks(rng, jnp.arange(3, 6), (20, 30))
  np.testing.assert_array_equal(whole[3:], part)
  assert whole.shape == (6, 20, 30) and 0 <= float(whole.min()) <= float(
      whole.max()) <= 1
  assert 0.3 < float(whole.mean()) < 0.7  # p = 0.5 of cells kept


def test_jit_once_per_shape(gap):
  model, variables, images = gap
  ex.explain("gradcam", model, variables, images)
  fn = ex._jitted("gradcam", model, ())
  before = fn._cache_size()
  ex.explain("gradcam", model, variables, images + 1.0, jnp.array([1, 2]))
  assert fn._cache_size() == before


def test_bad_input_errors(gap):
  model, variables, images = gap
  with pytest.raises(ValueError, match="known"):
    ex.explain("lime", model, variables, images)
  with pytest.raises(ValueError, match="options"):
    ex.explain("gradcam", model, variables, images, steps=3)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    ex.explain("gradcam", model, variables, images[..., 0])
  with pytest.raises(ValueError, match="labels"):
    ex.explain("gradcam", model, variables, images, jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="out of range for 5 classes"):
    ex.explain("gradcam", model, variables, images, jnp.array([1, 5]))


# -- ConvNeXt and ViT ------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
  return _model("brnpa", backbone="vit_test")


@pytest.mark.parametrize("backbone", ["convnext_test", "vit_test"])
def test_grad_cam_on_convnext_and_vit(backbone, request):
  """Grad-CAM reads the last feature grid of any backbone (the ViT's patch
  tokens), here under the BR-NPA head."""
  if backbone == "vit_test":  # the same model as the rollout tests'
    model, variables, images = request.getfixturevalue("vit")
  else:
    model, variables, images = _model("brnpa", backbone)
  maps = np.asarray(ex.explain("gradcam", model, variables, images))
  assert maps.shape == (B, H, W) and np.isfinite(maps).all()
  assert np.allclose(maps.max(axis=(1, 2)), 1, atol=1e-6)


def test_rollout_equals_a_direct_computation(vit):
  model, variables, images = vit
  attentions, (h, w) = ex.attention_weights(model, variables, images)
  assert len(attentions) == 2 and (h, w) == (8, 12)  # stride 4 at 32x48
  # Each value of each option once (every pair compiles the ViT anew; the
  # one-block test below runs mean with cls).
  for fusion, token in (("mean", "mean"), ("max", "cls")):
    r = np.eye(1 + h * w)[None]
    for a in attentions:
      a = np.asarray(a, np.float64)
      a = a.mean(1) if fusion == "mean" else a.max(1)
      a = (a + np.eye(a.shape[-1])) / 2
      r = (a / a.sum(-1, keepdims=True)) @ r
    rows = r[:, 0] if token == "cls" else r[:, 1:].mean(1)
    want = jax.image.resize(rows[:, 1:].reshape(B, h, w), (B, H, W), "bilinear")
    got = ex.explain("rollout", model, variables, images, head_fusion=fusion,
                     token=token)
    # float32 vs float64: the near-uniform maps' min-max scaling magnifies
    # rounding.
    np.testing.assert_allclose(got, _minmax(want), atol=1e-3)


def test_rollout_of_one_block_is_the_class_tokens_attention():
  """One block: the identity only adds to the class token's own column, so
  the map is its head-averaged attention to the patches."""
  model = Classifier(backbone=ViTTest(depth=1, width=8, overlap=2),
                     head=GAPHead(), num_classes=NUM_CLASSES)
  images = jax.random.normal(jax.random.key(1), (B, H, W, 3))
  variables = model.init(jax.random.key(0), images)
  (attn,), (h, w) = ex.attention_weights(model, variables, images)
  cls_row = np.asarray(attn).mean(1)[:, 0, 1:].reshape(B, h, w)
  want = _minmax(jax.image.resize(cls_row, (B, H, W), "bilinear"))
  got = ex.explain("rollout", model, variables, images, token="cls")
  # timm's initialisation gives near-uniform attention: the min-max scaling
  # stretches a narrow range, so float32 rounding shows at ~1e-5 absolute.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rollout_needs_a_transformer(gap):
  model, variables, images = gap
  with pytest.raises(ValueError, match="transformer backbone"):
    ex.explain("rollout", model, variables, images)
