"""ROAD's noisy linear imputation (Rong et al. 2022), batched in jax.

Each removed pixel takes the weighted mean of its 8 neighbours (weight 1/6
for the 4 edge neighbours, 1/12 for the 4 corner ones, those outside the
image left out), the kept pixels being fixed: per channel the sparse linear
system ``D_i x_i - sum_{j removed} w_ij x_j = sum_{k kept} w_ik x_k`` that
ROAD's code and Quantus's ``noisy_linear_imputation`` build and solve with
``scipy.sparse.linalg.spsolve``; then Gaussian noise of standard deviation
``noise`` is added to the removed pixels.

Here the system is solved matrix-free for a whole batch of images at once:
the operator is a 3x3 stencil applied to the (N, H, W, C) array, and the
solver is the conjugate-gradient method with the diagonal (Jacobi)
preconditioner. The matrix is the graph Laplacian of the pixel grid
restricted to the removed pixels, symmetric and positive definite wherever a
removed region touches a kept pixel, so CG converges; it stops when every
system's residual is below ``tol`` times its right-hand side, has taken
twice as many steps as it has unknowns, or has not fallen by 10% in 50 steps
(float32 stalls), or after ``max_iter`` steps. Against
scipy's direct solve the imputed values differ by at most about 6e-5
(for values of order 1)
(tests/test_quantus_golden.py; docs/explanations.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# (dy, dx) -> weight; ROAD's neighbour weights.
OFFSETS = tuple((dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
                for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
TOL = 1e-5
MAX_ITER = 2000
STALL = 50  # steps without a 10% fall of the residual that stop a system


def neighbour_sum(v_NxHxWxC) -> jax.Array:
  """``sum_j w_ij v_j`` over each pixel's in-image neighbours."""
  h, w = v_NxHxWxC.shape[1:3]
  pad = jnp.pad(v_NxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = jnp.zeros_like(v_NxHxWxC)
  for dy, dx, wt in OFFSETS:
    out = out + wt * pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
  return out


@functools.partial(jax.jit, static_argnames=("max_iter",))
def impute(images_NxHxWxC, removed_NxHxW, noise_NxHxWxC=None, *,
           tol: float = TOL, max_iter: int = MAX_ITER) -> jax.Array:
  """Images with the removed pixels linearly imputed (plus noise).

  Args:
    images_NxHxWxC: float images.
    removed_NxHxW: bool, True where a pixel is removed.
    noise_NxHxWxC: added to the removed pixels (already scaled: ROAD's
      ``noise * N(0, 1)``); None adds nothing.
    tol: relative residual at which CG stops.
    max_iter: CG steps at most.

  Returns:
    (N, H, W, C) float32.
  """
  x = jnp.asarray(images_NxHxWxC, jnp.float32)
  u = jnp.asarray(removed_NxHxW, jnp.float32)[..., None]
  diag = neighbour_sum(jnp.ones((1, *x.shape[1:3], 1), jnp.float32))
  inv_diag = u / diag

  def apply(v):  # the system's matrix, on the removed pixels only
    return u * (diag * v - neighbour_sum(u * v))

  b = u * neighbour_sum((1 - u) * x)
  dot = lambda p, q: jnp.sum(p * q, axis=(1, 2), keepdims=True)
  threshold = (tol ** 2) * jnp.maximum(dot(b, b), 1e-30)
  # In exact arithmetic CG ends within as many steps as unknowns; in float32
  # a system can stall just above ``tol`` and would hold up the batch: a
  # system also stops after twice its unknowns in steps, or when its
  # residual has not fallen by 10% in ``STALL`` steps.
  cap = 2 * jnp.sum(u, axis=(1, 2), keepdims=True) + 10

  def active(state):
    _, _, _, _, rr, best, since, i = state
    return (rr > threshold) & (i < cap) & (since < STALL)

  def cond(state):
    return (state[-1] < max_iter) & jnp.any(active(state))

  def body(state):
    sol, r, p, rz, _, best, since, i = state
    ap = apply(p)
    pap = dot(p, ap)
    alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
    sol = sol + alpha * p
    r = r - alpha * ap
    z = inv_diag * r
    rz_new = dot(r, z)
    beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
    rr = dot(r, r)
    better = rr < 0.81 * best  # the residual's norm fell by 10%
    return (sol, r, z + beta * p, rz_new, rr, jnp.where(better, rr, best),
            jnp.where(better, 0, since + 1), i + 1)

  z0 = inv_diag * b
  bb = dot(b, b)
  sol, *_ = jax.lax.while_loop(
      cond, body, (jnp.zeros_like(x), b, z0, dot(b, z0), bb, bb,
                   jnp.zeros_like(bb, jnp.int32), jnp.int32(0)))
  out = jnp.where(u > 0, sol, x)
  if noise_NxHxWxC is not None:
    out = out + u * jnp.asarray(noise_NxHxWxC, jnp.float32)
  return out


def impute_reference(image_CxHxW, removed_indices, noise_CxK=None) -> np.ndarray:
  """The same system built and solved directly with scipy (float64), for one
  channel-first image and the flat indices (y * W + x) of its removed pixels
  in any order; noise (C, K) is added in that order. For tests and
  benchmarks."""
  from scipy.sparse import lil_matrix, linalg  # scipy comes with jax
  c, h, w = image_CxHxW.shape
  flat = np.asarray(image_CxHxW, np.float64).reshape(c, -1)
  idx = np.asarray(removed_indices, np.int64)
  var = -np.ones(h * w, np.int64)
  var[idx] = np.arange(len(idx))
  a = lil_matrix((len(idx), len(idx)))
  rhs = np.zeros((len(idx), c))
  ys, xs = idx // w, idx % w
  diag = np.zeros(len(idx))
  for dy, dx, wt in OFFSETS:
    yy, xx = ys + dy, xs + dx
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    rows = np.nonzero(inside)[0]
    nb = yy[inside] * w + xx[inside]
    diag[rows] += wt
    unknown = var[nb] >= 0
    a[rows[unknown], var[nb[unknown]]] = -wt
    rhs[rows[~unknown]] += wt * flat[:, nb[~unknown]].T
  a[np.arange(len(idx)), np.arange(len(idx))] = diag
  out = flat.copy()
  out[:, idx] = linalg.spsolve(a.tocsc(), rhs).reshape(len(idx), c).T
  if noise_CxK is not None:
    out[:, idx] += noise_CxK
  return out.reshape(c, h, w)
