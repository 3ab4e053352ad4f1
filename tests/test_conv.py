"""The zoo's convolution and max pooling: CPU forms with the same results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from brnpa_jax.models.conv import conv_general_dilated, max_pool
from brnpa_jax.models.blocks import Conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _inputs(kernel=(1, 1), cin=6, cout=5, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, cin), dtype)
  w = jax.random.normal(jax.random.key(1), kernel + (cin, cout), dtype)
  return x, w


def _assert_same_values_and_gradients(ours, ref, x, w, grad_atol):
  """``ours(x, w)`` (jitted) equals ``ref(x, w)``, and so do the gradients of
  a non-linear loss for both arguments."""
  np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for got, want in zip(jax.grad(loss(ours), (0, 1))(x, w),
                       jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=grad_atol)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((0, 0), (0, 0))])
def test_pointwise_equals_convolution_forward_and_gradients(strides, padding):
  x, w = _inputs()
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                              dimension_numbers=dn)
  ours = lambda x, w: conv_general_dilated(x, w, strides, padding,
                                           dimension_numbers=dn)
  _assert_same_values_and_gradients(ours, ref, x, w, grad_atol=1e-5)


def test_pointwise_lowers_to_a_matmul_on_cpu_and_others_stay_convolutions():
  x, w1 = _inputs()
  _, w3 = _inputs(kernel=(3, 3))
  dn = lax.conv_dimension_numbers(x.shape, w1.shape, NHWC)
  lowered = lambda w, pad: jax.jit(
      lambda x, w: conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn)
  ).lower(x, w).as_text()
  assert jax.default_backend() == "cpu"
  text = lowered(w1, "SAME")
  assert "dot_general" in text and "convolution" not in text
  # A 3x3 kernel, or a padded 1x1, is a real convolution.
  assert "convolution" in lowered(w3, "SAME")
  assert "convolution" in lowered(w1, ((1, 1), (1, 1)))


def test_nchw_and_grouped_convolutions_are_left_to_lax():
  x, w = _inputs(cin=6, cout=4)
  x_nchw = jnp.transpose(x, (0, 3, 1, 2))
  w_oihw = jnp.transpose(w, (3, 2, 0, 1))
  nchw = ("NCHW", "OIHW", "NCHW")
  np.testing.assert_allclose(
      conv_general_dilated(x_nchw, w_oihw, (1, 1), "SAME", dimension_numbers=nchw),
      lax.conv_general_dilated(x_nchw, w_oihw, (1, 1), "SAME",
                               dimension_numbers=nchw), rtol=1e-6)
  wg = w[:, :, :3]  # two groups of 3 input channels
  dn = lax.conv_dimension_numbers(x.shape, wg.shape, NHWC)
  np.testing.assert_allclose(
      conv_general_dilated(x, wg, (1, 1), "SAME", dimension_numbers=dn,
                           feature_group_count=2),
      lax.conv_general_dilated(x, wg, (1, 1), "SAME", dimension_numbers=dn,
                               feature_group_count=2), rtol=1e-6)


@pytest.mark.parametrize("kernel,padding", [
    ((7, 7), ((3, 3), (3, 3))),   # ConvNeXt's
    ((3, 3), ((1, 1), (1, 1))),
    ((3, 5), ((0, 2), (1, 1))),   # uneven kernel and padding
])
def test_depthwise_is_a_shifted_sum_on_cpu_with_the_convolutions_results(
    kernel, padding):
  x, _ = _inputs(cin=6)
  w = jax.random.normal(jax.random.key(1), kernel + (1, 6))
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  ref = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=dn, feature_group_count=6)
  ours = lambda x, w: conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=dn, feature_group_count=6)
  _assert_same_values_and_gradients(ours, ref, x, w, grad_atol=1e-4)
  text = jax.jit(ours).lower(x, w).as_text()
  assert "convolution" not in text and "slice" in text
  # Strided depthwise convolutions stay XLA's.
  strided = jax.jit(lambda x, w: conv_general_dilated(
      x, w, (2, 2), padding, dimension_numbers=dn, feature_group_count=6))
  assert "convolution" in strided.lower(x, w).as_text()


def test_depthwise_flax_module_in_bfloat16_matches_nn_conv():
  x, _ = _inputs(cin=6, dtype=jnp.bfloat16)
  plain = nn.Conv(6, (7, 7), padding=3, feature_group_count=6, dtype=jnp.bfloat16)
  ours = Conv(6, (7, 7), padding=3, feature_group_count=6, dtype=jnp.bfloat16)
  variables = plain.init(jax.random.key(2), x)
  got, want = ours.apply(variables, x), plain.apply(variables, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)


def test_flax_module_has_nn_conv_parameters_and_outputs_in_bfloat16():
  x, _ = _inputs(dtype=jnp.bfloat16)
  plain = nn.Conv(5, (1, 1), (2, 2), dtype=jnp.bfloat16)
  ours = Conv(5, (1, 1), (2, 2), dtype=jnp.bfloat16)
  variables = plain.init(jax.random.key(2), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x))
          == jax.tree.map(jnp.shape, variables))
  got = ours.apply(variables, x)
  want = plain.apply(variables, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window,strides,padding,size", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 9),   # the ResNet stem
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 8),
    ((2, 2), (2, 2), ((0, 0), (0, 0)), 7),   # ResNet-12, odd size: floor
])
def test_max_pool_equals_flax_values_and_gradients_without_ties(
    window, strides, padding, size):
  x = jax.random.normal(jax.random.key(3), (2, size, size + 1, 4))
  ref = lambda x: nn.max_pool(x, window, strides, padding=padding)
  ours = lambda x: max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(jax.jit(ours)(x), ref(x))
  cot = jax.random.normal(jax.random.key(4), ref(x).shape)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cot))(x)
  np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-6, atol=1e-6)
  text = jax.jit(ours).lower(x).as_text()
  assert "reduce_window" not in text and "maximum" in text


def _tied_inputs(shape):
  """Inputs whose windows hold tied maxima."""
  stem = nn.Conv(4, (3, 3), padding=1)
  image = jnp.full(shape[:3] + (3,), 0.5)  # a constant image (IG's baselines)
  feats = stem.apply(stem.init(jax.random.key(6), image), image)
  return {
      "constant": jnp.full(shape, 0.7),
      "zeros": jnp.zeros(shape),
      "relu_constant_stem": jax.nn.relu(feats),
      "rounded": jnp.round(jax.random.normal(jax.random.key(7), shape)),
  }


@pytest.mark.parametrize("window,strides,padding", [
    ((3, 3), (2, 2), ((1, 1), (1, 1))),   # the ResNet stem
    ((2, 2), (2, 2), ((0, 0), (0, 0))),   # ResNet-12
])
def test_max_pool_gives_tied_maxima_reduce_windows_gradient(window, strides,
                                                             padding):
  ref = lambda x: nn.max_pool(x, window, strides, padding=padding)
  ours = lambda x: max_pool(x, window, strides, padding)
  for name, x in _tied_inputs((2, 8, 9, 4)).items():
    cot = jax.random.normal(jax.random.key(8), ref(x).shape)
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * cot)))(x)
    np.testing.assert_array_equal(ours(x), ref(x), err_msg=name)
    # Exactly: each window's gradient goes to one position, as reduce_window's
    # select-and-scatter does (a shared gradient would differ by 1/2 or more).
    np.testing.assert_array_equal(grad(ours), grad(ref), err_msg=name)
  # Forward mode gives the same first maximum's tangent.
  x = _tied_inputs((2, 8, 9, 4))["constant"]
  t = jax.random.normal(jax.random.key(9), x.shape)
  np.testing.assert_array_equal(jax.jvp(ours, (x,), (t,))[1],
                                jax.jvp(ref, (x,), (t,))[1])


def test_max_pool_bfloat16_values():
  x = jax.random.normal(jax.random.key(5), (1, 9, 9, 3), jnp.bfloat16)
  got = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(got, np.float32),
      np.asarray(nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1))),
                 np.float32))
