"""Property-based tests (hypothesis) of the BR-NPA operator and of the
deletion metric: random shapes, K, dtypes and value ranges.

The examples are derandomised (the same ones on every run, no example
database) and their number is fixed per property below (``_budget``), so
CI runs a known amount: BRNPA_HYPOTHESIS_SCALE=10 runs ten times as many,
freshly random, for a thorough local run. Shapes are drawn from small
ranges because every new shape compiles the operator once.
"""

import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from brnpa_jax import brnpa, brnpa_single
from brnpa_jax.explain import metrics

_SCALE = float(os.environ.get("BRNPA_HYPOTHESIS_SCALE", "1"))
settings.register_profile(
    "brnpa-ci",
    # A first example compiles (about a second on a loaded 2-core CPU);
    # the deadline only catches a hang.
    deadline=datetime.timedelta(seconds=60),
    derandomize=_SCALE == 1,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _budget(examples: int) -> settings:
  """The CI profile with this property's number of examples."""
  return settings(settings.get_profile("brnpa-ci"),
                  max_examples=max(1, round(examples * _SCALE)))


_brnpa = jax.jit(brnpa, static_argnames=("num_maps", "refine"))
_single = jax.jit(brnpa_single, static_argnames=("num_maps", "refine"))


# -- strategies ------------------------------------------------------------------
@st.composite
def _shape_and_k(draw, max_batch=3, max_side=4, max_channels=6):
  shape = (draw(st.integers(1, max_batch)), draw(st.integers(1, max_side)),
           draw(st.integers(1, max_side)), draw(st.integers(1, max_channels)))
  k = draw(st.integers(1, min(4, shape[1] * shape[2])))
  return shape, k


@st.composite
def _hypothesis_features(draw):
  """Element values chosen by hypothesis itself: zeros, ties, subnormals,
  and magnitudes from 1e-30 to 1e4 (non-negative: the operator's domain)."""
  shape, k = draw(_shape_and_k())
  dtype = draw(st.sampled_from([np.float32, jnp.bfloat16]))
  values = draw(hnp.arrays(np.float32, shape, elements=st.floats(
      0, 1e4, width=32, allow_nan=False, allow_infinity=False)))
  return jnp.asarray(values, dtype), k, draw(st.booleans())


@st.composite
def _seeded_features(draw, dtype=np.float32):
  """Continuous random values (no near-ties, so that two computations of the
  same selection agree) with hypothesis choosing the structure: scale,
  a fraction of zero positions and duplicated positions."""
  shape, k = draw(_shape_and_k())
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
  scale = 10.0 ** draw(st.integers(-3, 3))
  x = rng.uniform(0, scale, shape)
  b, h, w, c = shape
  flat = x.reshape(b, h * w, c)
  zero = rng.uniform(size=(b, h * w)) < draw(st.sampled_from([0, 0.3, 0.9]))
  flat[zero] = 0
  if draw(st.booleans()) and h * w > 1:  # exact ties: copies of position 0
    flat[:, rng.integers(1, h * w)] = flat[:, 0]
  return jnp.asarray(flat.reshape(shape), dtype), k, draw(st.booleans())


# -- operator ----------------------------------------------------------------------
@_budget(16)
@given(_hypothesis_features())
def test_maps_and_ranks_on_non_negative_input(case):
  """Maps are non-negative and sum to 1 (or are all zero); the first pick
  has the largest norm, each pick has the largest suppressed score of its
  round, and the picked scores never increase. Scores are recomputed in
  float64 from the operator's own picks, so the check holds with a float32
  tolerance even on ties."""
  feats, k, refine = case
  out = _brnpa(feats, num_maps=k, refine=refine)
  b, h, w, c = feats.shape
  maps = np.asarray(out.maps, np.float64).reshape(b, k, h * w)
  assert (maps >= 0).all()
  sums = maps.sum(-1)
  assert np.all((np.abs(sums - 1) < 1e-5) | (maps == 0).all(-1)), sums
  assert np.isfinite(np.asarray(out.norms)).all() and (out.norms >= 1e-5).all()
  assert ((out.indices >= 0) & (out.indices < h * w)).all()
  assert out.vectors.dtype == feats.dtype
  assert np.isfinite(np.asarray(out.vectors, np.float32)).all()
  x = np.asarray(feats, np.float64).reshape(b, h * w, c)
  if not refine:
    np.testing.assert_array_equal(
        np.asarray(out.vectors, np.float64),
        np.take_along_axis(x, np.asarray(out.indices)[..., None], axis=1))
  for i in range(b):
    n = np.linalg.norm(x[i], axis=1) + 1e-5
    tol = 1e-5 * n.max()
    score = n.copy()
    picked = []
    for j in np.asarray(out.indices[i]):
      assert score[j] >= score.max() - tol, (score[j], score.max())
      picked.append(score[j])
      s = x[i] @ x[i, j] / (n * n[j])
      score = (1 - s) * score
    assert n[out.indices[i, 0]] >= n.max() - tol
    assert np.all(np.diff(picked) <= tol), picked


@_budget(4)
@given(_seeded_features())
def test_vmapped_batch_equals_a_loop_over_examples(case):
  feats, k, refine = case
  batched = _brnpa(feats, num_maps=k, refine=refine)
  for b in range(feats.shape[0]):
    single = _single(feats[b], num_maps=k, refine=refine)
    np.testing.assert_array_equal(single.indices, batched.indices[b])
    for got, want in zip(single[:3], batched[:3]):
      np.testing.assert_allclose(got, want[b], rtol=1e-6,
                                 atol=1e-6 * float(jnp.max(jnp.abs(want))))


@_budget(2)
@given(_seeded_features())
def test_jit_equals_eager(case):
  feats, k, refine = case
  eager = brnpa(feats, k, refine=refine)
  jitted = _brnpa(feats, num_maps=k, refine=refine)
  np.testing.assert_array_equal(eager.indices, jitted.indices)
  for got, want in zip(eager[:3], jitted[:3]):
    np.testing.assert_allclose(got, want, rtol=1e-6,
                               atol=1e-6 * float(jnp.max(jnp.abs(want))))


@_budget(4)
@given(_seeded_features(jnp.bfloat16))
def test_bfloat16_is_float32_on_the_same_values(case):
  """bfloat16 features select and weigh in float32, so maps, norms and
  picks equal float32's on the same (rounded) values; the vectors differ by
  bfloat16 rounding of the maps and of the result (x >= 0: |v| bounds it)."""
  feats16, k, refine = case
  out16 = _brnpa(feats16, num_maps=k, refine=refine)
  out32 = _brnpa(feats16.astype(jnp.float32), num_maps=k, refine=refine)
  np.testing.assert_array_equal(out16.indices, out32.indices)
  np.testing.assert_allclose(out16.maps, out32.maps, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(out16.norms, out32.norms, rtol=1e-6)
  v16 = np.asarray(out16.vectors, np.float32)
  v32 = np.asarray(out32.vectors)
  assert np.all(np.abs(v16 - v32) <= 2 ** -7 * np.abs(v32) + 1e-30)


@_budget(3)
@given(_seeded_features())
def test_forward_mode_is_the_transpose_of_reverse_mode(case):
  """<J t, g> = <t, J^T g> for cotangents on vectors, maps and norms."""
  feats, k, refine = case
  f = lambda x: brnpa(x, k, refine=refine)[:3]
  rng = np.random.default_rng(feats.size)
  t = jnp.asarray(rng.standard_normal(feats.shape), jnp.float32)
  shapes = jax.eval_shape(f, feats)
  gs = tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32)
             for o in shapes)
  jt, vjt = jax.jit(lambda x, t, g: (jax.jvp(f, (x,), (t,))[1],
                                     jax.vjp(f, x)[1](g)[0]))(feats, t, gs)
  lhs = sum(float(jnp.vdot(a, g)) for a, g in zip(jt, gs))
  rhs = float(jnp.vdot(t, vjt))
  scale = (sum(float(jnp.sum(jnp.abs(a * g))) for a, g in zip(jt, gs))
           + float(jnp.sum(jnp.abs(t * vjt))))
  assert abs(lhs - rhs) <= 1e-4 * scale + 1e-30, (lhs, rhs)


# -- deletion metric ----------------------------------------------------------------
def _mass_model(variables, images_BxHxWx3):
  """Class 0's logit grows with the image's total (non-negative) mass, so
  deleting pixels (setting them to 0) can only lower its probability."""
  mass = jnp.sum(images_BxHxWx3, axis=(1, 2, 3)) * variables["gain"]
  return jnp.stack([mass, jnp.zeros_like(mass)], axis=-1)


_CURVES = metrics.PerturbationCurves(_mass_model, chunk_size=16)


@st.composite
def _deletion_case(draw):
  b = draw(st.integers(1, 2))
  cells = draw(st.sampled_from([(2, 2), (2, 4), (4, 4)]))
  size = draw(st.sampled_from([8, 16]))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
  images = rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32)
  images *= rng.uniform(size=(b, size, size, 1)) < 0.7  # some empty pixels
  saliency = draw(hnp.arrays(np.float32, (b, *cells), elements=st.floats(
      -1, 1, width=32)))
  return images, saliency, draw(st.integers(2, cells[0] * cells[1]))


@_budget(4)
@given(_deletion_case())
def test_deletion_curves_never_rise_and_mass_order_is_lowest(case):
  """For a model whose score is a monotone function of the kept mass,
  every deletion curve is non-increasing in the cells removed, and ranking
  cells by their true mass gives the lowest curve point by point (both
  protocols)."""
  images, saliency, steps = case
  variables = {"gain": jnp.float32(0.05)}
  classes = np.zeros(len(images), np.int32)
  b, size = images.shape[:2]
  cells = saliency.shape[1:]
  mass = images.sum(-1).reshape(b, cells[0], size // cells[0], cells[1],
                                size // cells[1]).sum((2, 4))
  for protocol, kwargs, best in (
      ("release", dict(steps=steps), mass),
      ("standard", dict(pixels_per_step=size * steps), images.sum(-1))):
    run = getattr(_CURVES, protocol)
    got = run(variables, images, saliency, classes_B=classes,
              modes=("deletion",), **kwargs)["deletion_curve"]
    assert np.all(np.diff(got, axis=1) <= 1e-6), (protocol, got)
    lowest = run(variables, images, best, classes_B=classes,
                 modes=("deletion",), **kwargs)["deletion_curve"]
    assert np.all(lowest <= got + 1e-6), (protocol, lowest, got)
