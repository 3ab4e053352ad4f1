"""The BR-NPA operator: reference values from the authors' release, its
derivatives in both autodiff modes, and its domain. (Batching against a loop
and forward mode as the transpose of reverse mode: the properties in
tests/test_properties.py.)

``brnpa_reference.npz`` holds the release operator's outputs and input
gradients; ``python -m brnpa_jax.tools.brnpa_golden`` regenerates them.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import brnpa_jax
from brnpa_jax import brnpa, brnpa_single
from brnpa_jax.tools import brnpa_golden

FIXTURE = os.path.join(os.path.dirname(__file__), "brnpa_reference.npz")
CASES = ("small", "rect", "k5", "norefine", "wide")
# One compiled program per shape instead of op-by-op dispatch: cheaper in CI.
_brnpa = jax.jit(brnpa, static_argnames=("num_maps", "refine"))
_single = jax.jit(brnpa_single, static_argnames=("num_maps", "init"))


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


@pytest.fixture(scope="module")
def reference():
  return np.load(FIXTURE)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_release(reference, case):
  feats = jnp.asarray(reference[f"{case}/features_nhwc"])
  k = int(reference[f"{case}/k"])
  refine = not bool(reference[f"{case}/no_refine"])
  cot = reference[f"{case}/cotangent"]
  out, grad = jax.jit(lambda f: (  # one compiled program per case
      brnpa(f, k, refine=refine),
      jax.grad(lambda f: jnp.sum(brnpa(f, k, refine=refine).vectors * cot))(f)
  ))(feats)
  assert _rel_err(out.vectors, reference[f"{case}/vectors"]) <= 1e-5
  assert _rel_err(out.maps, reference[f"{case}/maps_bkhw"]) <= 1e-5
  assert _rel_err(grad, reference[f"{case}/grad_nhwc"]) <= 1e-5


def test_reference_names_the_release_it_comes_from(reference):
  assert str(reference["release_commit"]) == brnpa_golden.RELEASE_COMMIT
  assert set(brnpa_golden.CASES) == set(CASES)


def _feats(seed=0, shape=(4, 6, 7, 16)):
  return jax.nn.relu(jax.random.normal(jax.random.key(seed), shape))


def test_exported_at_top_level():
  assert brnpa_jax.brnpa is brnpa
  out = brnpa(_feats(), 3)
  assert isinstance(out, brnpa_jax.BRNPAOutput)
  chex.assert_shape(out.vectors, (4, 3, 16))
  chex.assert_shape(out.maps, (4, 3, 6, 7))
  chex.assert_shape(out.norms, (4, 6, 7))
  chex.assert_shape(out.indices, (4, 3))
  assert out.indices.dtype == jnp.int32 and out.maps.dtype == jnp.float32


def test_maps_sum_to_one_per_rank():
  out = brnpa(_feats(), 4)
  np.testing.assert_allclose(out.maps.sum(axis=(2, 3)), 1.0, rtol=1e-6)


def test_ranks_in_selection_order():
  """Rank 1 is the most active position; each later pick maximises the
  suppressed score, and its vector is the map-weighted mean."""
  feats = _feats(1)
  out = brnpa(feats, 3)
  x = np.asarray(feats, np.float64).reshape(4, -1, 16)
  norms = np.linalg.norm(x, axis=-1) + 1e-5
  for b in range(4):
    score = norms[b].copy()
    for k in range(3):
      j = int(np.argmax(score))
      assert out.indices[b, k] == j
      s = x[b] @ x[b, j] / (norms[b] * norms[b, j])
      np.testing.assert_allclose(out.maps[b, k].ravel(), s / s.sum(), rtol=1e-5)
      np.testing.assert_allclose(out.vectors[b, k], (s / s.sum()) @ x[b], rtol=1e-5)
      score = (1 - s) * score
  np.testing.assert_allclose(out.norms, norms.reshape(4, 6, 7), rtol=1e-6)


def test_no_refine_returns_selected_vectors():
  feats = _feats(2)
  out = brnpa(feats, 3, refine=False)
  flat = feats.reshape(4, -1, 16)
  np.testing.assert_array_equal(out.vectors, jnp.take_along_axis(
      flat, out.indices[..., None], axis=1))


def test_random_init_uses_rng_and_is_reproducible():
  feats = _feats(4)
  a = brnpa(feats, 3, init="random", rng=jax.random.key(0))
  b = brnpa(feats, 3, init="random", rng=jax.random.key(0))
  c = brnpa(feats, 3, init="random", rng=jax.random.key(1))
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, c.indices)
  np.testing.assert_allclose(a.maps.sum(axis=(2, 3)), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="rng"):
    brnpa(feats, 3, init="random")


def test_random_init_is_the_release_rule():
  """Each round picks the argmax of a fresh uniform draw, unsuppressed.

  Two orthogonal groups of positions (left half e0, right half e1): once a
  position of one group is picked, multiplying the next draw by the
  suppression (1 - s) would force the next pick into the other group; the
  release's rule may stay in the same group.
  """
  h, w, k = 4, 4, 3
  feats = np.zeros((h, w, 2), np.float32)
  feats[:, : w // 2, 0] = 1.0
  feats[:, w // 2:, 1] = 1.0
  group = (np.arange(h * w) % w) >= w // 2
  x = feats.reshape(-1, 2)
  same_group_seen = False
  for seed in range(20):
    key = jax.random.key(seed)
    out = _single(jnp.asarray(feats), num_maps=k, init="random", rng=key)
    draws = np.asarray(jax.random.uniform(key, (k, h * w)))
    np.testing.assert_array_equal(out.indices, draws.argmax(axis=1))
    j1, j2 = int(out.indices[0]), int(out.indices[1])
    if group[j1] == group[j2]:
      same_group_seen = True
      s1 = x @ x[j1] / ((np.linalg.norm(x, axis=1) + 1e-5) * (1 + 1e-5))
      suppressed_pick = int(np.argmax((1 - s1) * draws[1]))
      assert group[suppressed_pick] != group[j1] and suppressed_pick != j2
  assert same_group_seen
  # Positions may be picked again; the maps are still those of each pick.
  s = x @ x.T / np.outer(np.linalg.norm(x, axis=1) + 1e-5,
                         np.linalg.norm(x, axis=1) + 1e-5)
  np.testing.assert_allclose(out.maps.reshape(k, -1),
                             (s / s.sum(1, keepdims=True))[out.indices],
                             rtol=1e-6)


def test_jit_does_not_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(f):
    return brnpa(f, 3)

  for seed in range(3):
    run(_feats(seed)).vectors.block_until_ready()


# One program for the three degenerate cases (they share a shape).
_out_and_grad = jax.jit(lambda f: (brnpa(f, 3), jax.grad(
    lambda f: jnp.sum(brnpa(f, 3).vectors ** 2)
    + jnp.sum(brnpa(f, 3).maps ** 2))(f)))


@pytest.mark.parametrize("kind", ["zeros", "constant", "single_position"])
def test_degenerate_inputs_stay_finite(kind):
  feats = jnp.zeros((2, 5, 5, 8))
  if kind == "constant":
    feats = feats + 0.7
  elif kind == "single_position":
    feats = feats.at[:, 2, 3, :].set(1.5)
  out, grad = _out_and_grad(feats)
  for x in out:
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all(np.isfinite(np.asarray(grad)))
  if kind == "zeros":
    np.testing.assert_array_equal(out.maps, 0.0)
    np.testing.assert_array_equal(out.vectors, 0.0)
  elif kind == "constant":
    np.testing.assert_allclose(out.maps, 1.0 / 25, rtol=1e-5)
  else:
    assert int(out.indices[0, 0]) == 2 * 5 + 3
    np.testing.assert_allclose(out.maps[:, 0, 2, 3], 1.0, rtol=1e-6)


def test_picks_repeat_once_everything_is_represented():
  """One non-zero position p among zeros: p's suppressed score (~2e-5)
  beats the zeros' 1e-5 once, then a zero position (all-zero map) wins."""
  feats = jnp.zeros((1, 3, 3, 4)).at[0, 1, 2].set(1.5)
  out = _brnpa(feats, num_maps=3)
  np.testing.assert_array_equal(out.indices, [[5, 5, 0]])
  np.testing.assert_allclose(out.maps[0, :2].reshape(2, -1),
                             np.eye(9)[[5, 5]], atol=1e-6)
  np.testing.assert_array_equal(out.maps[0, 2], 0.0)
  np.testing.assert_array_equal(out.vectors[0, 2], 0.0)


def test_bfloat16_input():
  """bfloat16 keeps 8 significant bits: each rounding is off by at most
  u = 2^-8 relative. A vector meets three (the features, the maps cast for
  the matmul, the result; the float32 accumulation adds nothing comparable)
  and the maps move by O(u) with the rounded features; every term is
  non-negative, so the errors cannot cancel into a larger relative one.
  Measured: at most 1.06 u here (1.41 u over seeds 0-7); bound 4 u."""
  feats = _feats(5)
  out16 = brnpa(feats.astype(jnp.bfloat16), 3)
  out32 = brnpa(feats, 3)
  assert out16.vectors.dtype == jnp.bfloat16
  assert out16.maps.dtype == jnp.float32
  np.testing.assert_allclose(out16.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(out16.indices, out32.indices)  # same picks
  np.testing.assert_allclose(np.asarray(out16.vectors, np.float32), out32.vectors,
                             rtol=4 * 2.0 ** -8, atol=0)
  grad = jax.grad(lambda f: jnp.sum(brnpa(f, 3).vectors.astype(jnp.float32)))(
      feats.astype(jnp.bfloat16))
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="H, W, C"):
    brnpa(jnp.zeros((5, 5, 8)), 3)
  with pytest.raises(ValueError, match="use brnpa"):
    brnpa_single(jnp.zeros((2, 5, 5, 8)), 3)
  with pytest.raises(ValueError, match="num_maps"):
    brnpa(_feats(), 0)
  with pytest.raises(TypeError, match="num_maps must be an int"):
    brnpa(_feats(), 2.0)
  with pytest.raises(TypeError, match="num_maps must be an int"):
    brnpa(_feats(), True)
  with pytest.raises(TypeError, match="refine must be a bool"):
    brnpa(_feats(), 2, refine=1)
  with pytest.raises(ValueError, match="init"):
    brnpa(_feats(), 3, init="max")
  with pytest.raises(TypeError, match="floating"):
    brnpa(jnp.zeros((1, 2, 2, 3), jnp.int32), 2)
  with pytest.raises(TypeError, match="floating"):
    brnpa_single(jnp.zeros((2, 2, 3), jnp.int32), 2)


def test_numpy_scalars_as_static_arguments():
  feats = _feats(6)
  want = brnpa(feats, 3, refine=False)
  for num_maps in (np.int64(3), np.int32(3), np.array(3)):
    got = brnpa(feats, num_maps, refine=np.bool_(False))
    chex.assert_trees_all_equal(got, want)
  got = jax.jit(brnpa, static_argnames=("num_maps", "refine"))(
      feats, num_maps=np.int64(3), refine=np.bool_(False))
  chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_traced_static_arguments_say_how_to_mark_them_static():
  feats = _feats(7)
  with pytest.raises(TypeError, match=r"num_maps is a traced value.*"
                     r"static_argnames=\('num_maps',\)"):
    jax.jit(brnpa)(feats, 3)
  with pytest.raises(TypeError, match=r"refine is a traced value.*"
                     r"static_argnames=\('refine',\)"):
    jax.jit(lambda f, r: brnpa(f, 3, refine=r))(feats, True)
  got = jax.jit(brnpa, static_argnames="num_maps")(feats, 3)
  chex.assert_trees_all_close(got, brnpa(feats, 3), rtol=1e-6)


def test_more_maps_than_positions_is_an_error():
  with pytest.raises(ValueError, match=r"num_maps=5 .* 2x2=4 positions"):
    brnpa(jnp.ones((1, 2, 2, 3)), 5)
  with pytest.raises(ValueError, match=r"num_maps=2 .* 1x1=1 positions"):
    brnpa_single(jnp.ones((1, 1, 3)), 2)
  out = _brnpa(_feats(8, (1, 2, 2, 3)), num_maps=4)  # K = H * W is fine
  np.testing.assert_allclose(out.maps.sum(axis=(2, 3)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("refine", [True, False])
def test_non_finite_positions_are_left_out_and_flagged(refine):
  """NaN or Inf at some positions of image 0: never selected, weight 0 in
  the (finite) maps, norms non-finite exactly there, vectors NaN; image 1
  is untouched."""
  clean = np.asarray(_feats(9, (2, 4, 5, 6)))
  feats = clean.copy()
  feats[0, 1, 2, 3] = np.nan
  feats[0, 3, 0, 1] = np.inf
  bad = np.zeros((4, 5), bool)
  bad[1, 2] = bad[3, 0] = True
  out = _brnpa(jnp.asarray(feats), num_maps=3, refine=refine)
  ref = _brnpa(jnp.asarray(clean), num_maps=3, refine=refine)
  for got, want in zip(out, ref):
    np.testing.assert_array_equal(got[1], want[1])
  assert not np.isin(out.indices[0], np.flatnonzero(bad)).any()
  maps0 = np.asarray(out.maps[0])
  assert np.isfinite(maps0).all()
  np.testing.assert_array_equal(maps0[:, bad], 0.0)
  np.testing.assert_allclose(maps0.sum(axis=(1, 2)), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(~np.isfinite(np.asarray(out.norms[0])), bad)
  assert np.isnan(np.asarray(out.vectors[0])).all()
  # The remaining positions are ranked as if the bad ones were absent.
  masked = np.where(bad[..., None], 0.0, clean[0])
  np.testing.assert_array_equal(out.indices[0],
                                _brnpa(masked[None], num_maps=3).indices[0])


def test_checks_report_non_finite_and_negative_features():
  good = _feats(10)
  nan = good.at[1, 2, 3, 4].set(jnp.nan)
  neg = good.at[0, 0, 0, 0].set(-2.0)
  # Eagerly a failed check raises at once.
  with pytest.raises(checkify.JaxRuntimeError, match="1 feature values are NaN"):
    brnpa(nan, 3, checks=True)
  with pytest.raises(checkify.JaxRuntimeError, match=r"negative \(smallest -2"):
    brnpa_single(neg[0], 3, checks=True)
  # Under jit, functionalised with checkify.
  checked = jax.jit(checkify.checkify(lambda f: brnpa(f, 3, checks=True)))
  err, out = checked(good)
  assert err.get() is None
  chex.assert_trees_all_close(out, brnpa(good, 3), rtol=1e-6)
  assert "NaN or Inf" in checked(nan)[0].get()
  assert "negative" in checked(neg)[0].get()
  # checks=False adds nothing: plain jit accepts it.
  jax.jit(lambda f: brnpa(f, 3))(nan)


def test_negative_features_use_the_same_formulas():
  """Outside the domain: maps are s / sum(s), so they can hold negative
  weights, and still sum to 1."""
  x = np.asarray(jax.random.normal(jax.random.key(11), (1, 3, 4, 5)))
  out = _brnpa(jnp.asarray(x), num_maps=2)
  flat = x.reshape(-1, 5).astype(np.float64)
  n = np.linalg.norm(flat, axis=1) + 1e-5
  score = n.copy()
  for k in range(2):
    j = int(np.argmax(score))
    assert int(out.indices[0, k]) == j
    s = flat @ flat[j] / (n * n[j])
    np.testing.assert_allclose(out.maps[0, k].ravel(), s / s.sum(), rtol=1e-4,
                               atol=1e-6)
    score = (1 - s) * score
  assert (out.maps < 0).any()
  np.testing.assert_allclose(out.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)


def test_float64_features_compute_in_float64():
  with jax.enable_x64(True):
    x = np.random.default_rng(12).uniform(0, 1, (2, 3, 4, 5))
    out = _brnpa(jnp.asarray(x), num_maps=3)
    assert out.maps.dtype == out.norms.dtype == out.vectors.dtype == jnp.float64
    want = jax.jit(jax.vmap(lambda f: _reference(f, 3, True)))(jnp.asarray(x))
    for got, ref in zip(out[:3], want):
      np.testing.assert_allclose(got, ref, rtol=1e-12)


# -- derivatives -------------------------------------------------------------------
def _reference(feats_HxWxC, num_maps, refine):
  """The paper's loop in plain jnp, for plain autodiff: (vectors, maps, norms).

  The selection goes through argmax only, so autodiff passes no gradient
  through it, as in the paper. Features must have no all-zero position
  (sqrt has no derivative at 0).
  """
  h, w, c = feats_HxWxC.shape
  x = feats_HxWxC.reshape(h * w, c)
  n = jnp.sqrt(jnp.sum(x * x, axis=-1)) + 1e-5
  score = n
  vectors, maps = [], []
  for _ in range(num_maps):
    j = jnp.argmax(score)
    s = x @ x[j] / (n * n[j])
    a = s / jnp.sum(s)
    vectors.append(a @ x if refine else x[j])
    maps.append(a)
    score = (1 - s) * score
  return (jnp.stack(vectors), jnp.stack(maps).reshape(num_maps, h, w),
          n.reshape(h, w))


def _positive_feats(seed, shape, dtype):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.05, 1.0, shape) * (rng.uniform(size=shape) > 0.3)
  x[..., 0] += 0.05  # no all-zero position
  return jnp.asarray(x, dtype)


def _cotangents(seed, shapes, dtype):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]


@pytest.mark.parametrize("dtype,num_maps,refine", [
    ("float32", 3, True), ("float32", 3, False), ("float64", 1, True),
    ("float64", 5, True), ("float64", 3, False)])
def test_gradient_matches_plain_autodiff_of_a_jnp_reference(dtype, num_maps,
                                                            refine):
  """Cotangents on vectors, maps and norms at once."""
  rtol = {"float32": 2e-4, "float64": 1e-10}[dtype]
  with jax.enable_x64(dtype == "float64"):
    feats = _positive_feats(num_maps, (2, 4, 5, 6), dtype)
    g_vec, g_maps, g_norms = _cotangents(
        num_maps, [(2, num_maps, 6), (2, num_maps, 4, 5), (2, 4, 5)], dtype)

    def loss(outputs):
      vectors, maps, norms = outputs
      return (jnp.sum(vectors * g_vec) + jnp.sum(maps * g_maps)
              + jnp.sum(norms * g_norms))

    reference = jax.vmap(lambda x: _reference(x, num_maps, refine))
    ours, ref = jax.jit(lambda f: (
        jax.grad(lambda f: loss(brnpa(f, num_maps, refine=refine)[:3]))(f),
        jax.grad(lambda f: loss(reference(f)))(f)))(feats)
    assert ours.dtype == ref.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(ours, ref, rtol=rtol,
                               atol=rtol * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("refine", [True, False])
def test_forward_mode_matches_finite_differences(refine):
  """jax.jvp and jax.jacfwd in float64 against central differences (the
  selection does not change within the step) and against reverse mode."""
  with jax.enable_x64(True):
    feats = _positive_feats(13, (2, 3, 4, 5), "float64")
    tangent = jax.random.normal(jax.random.key(14), feats.shape, jnp.float64)
    f = jax.jit(lambda x: brnpa(x, 3, refine=refine)[:3])
    eps = 1e-6
    _, jvp_out = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(feats, tangent)
    plus, minus = f(feats + eps * tangent), f(feats - eps * tangent)
    for got, p, m in zip(jvp_out, plus, minus):
      fd = (p - m) / (2 * eps)
      np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-8 * np.abs(fd).max())
    vec = lambda x: brnpa(x, 2, refine=refine).vectors
    np.testing.assert_allclose(jax.jit(jax.jacfwd(vec))(feats),
                               jax.jit(jax.jacrev(vec))(feats),
                               rtol=1e-12, atol=1e-14)


def test_hessian_matches_finite_differences_of_the_gradient():
  with jax.enable_x64(True):
    one = _positive_feats(13, (3, 4, 5), "float64")
    tangent = jax.random.normal(jax.random.key(14), one.shape, jnp.float64)

    def scalar(x):
      out = brnpa_single(x, 2)
      return jnp.sum(out.vectors ** 2) + jnp.sum(out.maps ** 3)

    hvp = jnp.tensordot(jax.jit(jax.hessian(scalar))(one), tangent, axes=3)
    grad = jax.jit(jax.grad(scalar))
    eps = 1e-6
    fd = (grad(one + eps * tangent) - grad(one - eps * tangent)) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())
