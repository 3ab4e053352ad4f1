"""The BR-NPA operator: reference values from the authors' release, properties."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brnpa_jax
from brnpa_jax import brnpa, brnpa_single

FIXTURE = os.path.join(os.path.dirname(__file__), "brnpa_reference.npz")
CASES = ("small", "rect", "k5", "norefine", "wide")


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
  out = brnpa(feats, k, refine=refine)
  assert _rel_err(out.vectors, reference[f"{case}/vectors"]) <= 1e-5
  assert _rel_err(out.maps, reference[f"{case}/maps_bkhw"]) <= 1e-5
  cot = reference[f"{case}/cotangent"]
  grad = jax.grad(lambda f: jnp.sum(brnpa(f, k, refine=refine).vectors * cot))(feats)
  assert _rel_err(grad, reference[f"{case}/grad_nhwc"]) <= 1e-5


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


def test_vmapped_batch_equals_loop():
  feats = _feats(3)
  batched = brnpa(feats, 3)
  for b in range(feats.shape[0]):
    single = brnpa_single(feats[b], 3)
    for got, want in zip(single, batched):
      np.testing.assert_allclose(got, want[b], rtol=1e-6, atol=1e-7)


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


def test_jit_does_not_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(f):
    return brnpa(f, 3)

  for seed in range(3):
    run(_feats(seed)).vectors.block_until_ready()


@pytest.mark.parametrize("kind", ["zeros", "constant", "single_position"])
def test_degenerate_inputs_stay_finite(kind):
  feats = jnp.zeros((2, 5, 5, 8))
  if kind == "constant":
    feats = feats + 0.7
  elif kind == "single_position":
    feats = feats.at[:, 2, 3, :].set(1.5)
  out = brnpa(feats, 3)
  for x in out:
    assert np.all(np.isfinite(np.asarray(x)))
  grad = jax.grad(lambda f: jnp.sum(brnpa(f, 3).vectors ** 2)
                  + jnp.sum(brnpa(f, 3).maps ** 2))(feats)
  assert np.all(np.isfinite(np.asarray(grad)))
  if kind == "zeros":
    np.testing.assert_array_equal(out.maps, 0.0)
    np.testing.assert_array_equal(out.vectors, 0.0)
  elif kind == "constant":
    np.testing.assert_allclose(out.maps, 1.0 / 25, rtol=1e-5)
  else:
    assert int(out.indices[0, 0]) == 2 * 5 + 3
    np.testing.assert_allclose(out.maps[:, 0, 2, 3], 1.0, rtol=1e-6)


def test_bfloat16_input():
  feats = _feats(5)
  out16 = brnpa(feats.astype(jnp.bfloat16), 3)
  out32 = brnpa(feats, 3)
  assert out16.vectors.dtype == jnp.bfloat16
  assert out16.maps.dtype == jnp.float32
  np.testing.assert_allclose(out16.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out16.vectors, np.float32), out32.vectors,
                             rtol=5e-2, atol=5e-2)
  grad = jax.grad(lambda f: jnp.sum(brnpa(f, 3).vectors.astype(jnp.float32)))(
      feats.astype(jnp.bfloat16))
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="H, W, C"):
    brnpa(jnp.zeros((5, 5, 8)), 3)
  with pytest.raises(ValueError, match="num_maps"):
    brnpa(_feats(), 0)
  with pytest.raises(ValueError, match="init"):
    brnpa(_feats(), 3, init="max")
  with pytest.raises(TypeError, match="floating"):
    brnpa(jnp.zeros((1, 2, 2, 3), jnp.int32), 2)
