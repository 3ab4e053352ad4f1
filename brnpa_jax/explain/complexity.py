"""Complexity of saliency maps as Quantus 0.6.0 defines it (docs/explanations.md).

- ``entropy``: Shannon entropy of the map's mass (Bhatt et al. 2020;
  Quantus's ``Complexity``): the absolute map divided by its sum is a
  distribution over pixels; lower = more concentrated.
- ``sparseness``: the Gini index of the absolute map (Chalasani et al. 2020;
  Quantus's ``Sparseness``); higher = sparser.

Both read a map at whatever resolution it is given (evaluation passes maps
upsampled to the input, as Quantus sees them) and are batched over images:
pure jnp, jit-compiled once per shape. Quantus first divides the whole batch
by its largest absolute value; a positive scale changes neither metric except
through its small constants (1e-12 in the logarithm, 1e-7 added to every
value of the Gini index), so each map is scaled by its own maximum here, which
makes an image's value independent of the batch it was evaluated in.

Relation to ``metrics.sparsity`` (the paper's): that is the mean of the
max-normalised map (lower = sparser). For a map that is 1 on m of n pixels
and 0 elsewhere it is m/n and the Gini index is 1 - m/n (up to the 1e-7), so
for such maps ``sparseness = 1 - sparsity``; for graded maps the Gini index
also rewards an unequal spread of the mass below the peak, which the
mean-over-peak does not see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ENTROPY_EPS = 1e-12  # Quantus's, inside the logarithm
GINI_EPS = 1e-7  # Quantus's, added to every value


def _flat_abs_by_max(maps_Bxhxw) -> jax.Array:
  a = jnp.abs(jnp.asarray(maps_Bxhxw, jnp.float32))
  a = a.reshape(a.shape[0], -1)
  peak = jnp.max(a, axis=1, keepdims=True)
  return a / jnp.where(peak > 0, peak, 1.0)


@jax.jit
def entropy(maps_Bxhxw) -> jax.Array:
  """Entropy (nats) of ``|a| / sum |a|`` per image; (B,) float32."""
  a = _flat_abs_by_max(maps_Bxhxw)
  p = a / jnp.sum(a, axis=1, keepdims=True)
  return -jnp.sum(p * jnp.log(p + ENTROPY_EPS), axis=1)


@jax.jit
def sparseness(maps_Bxhxw) -> jax.Array:
  """Gini index of ``|a| + 1e-7`` per image, in [0, 1); (B,) float32.

  ``G = sum_k (2k - n - 1) a_(k) / (n sum_k a_(k))`` with ``a_(k)`` the
  values in ascending order, k = 1..n.
  """
  a = _flat_abs_by_max(maps_Bxhxw) + GINI_EPS
  # Non-negative floats sort as their bits do; XLA sorts integers on a CPU
  # about 9x faster than floats (no NaN-aware comparator).
  bits = jnp.sort(jax.lax.bitcast_convert_type(a, jnp.uint32), axis=1)
  a = jax.lax.bitcast_convert_type(bits, jnp.float32)
  n = a.shape[1]
  k = jnp.arange(1, n + 1, dtype=jnp.float32)
  return jnp.sum((2 * k - n - 1) * a, axis=1) / (n * jnp.sum(a, axis=1))
