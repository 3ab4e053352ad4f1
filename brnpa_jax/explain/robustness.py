"""Robustness of explanations: max- and average sensitivity (Yeh et al. 2019),
as Quantus 0.6.0 defines them (docs/explanations.md).

For N draws of uniform noise in ``[-radius, radius]`` added to every input
value, the map of the perturbed image is computed again and compared with the
map of the image: ``||a - a_n||_2 / ||a||_2`` over all pixels. Max-sensitivity
is the largest of the N ratios, average sensitivity their mean. Quantus's
defaults: N = 200, radius 0.2, maps neither normalised nor made absolute (the
method's own maps are compared as they are).

``explain_fn(images, classes) -> maps (B, h, w)`` is any batched explainer
(a model's own maps, Grad-CAM, ...); the N perturbed batches are explained
one after another, each batched over the images. The noise comes from a key
or is passed in explicitly (the golden tests against Quantus do).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

RADIUS = 0.2  # Quantus's lower_bound
SAMPLES = 200  # Quantus's nr_samples

ExplainFn = Callable[[jax.Array, jax.Array], jax.Array]


@jax.jit
def _ratio(maps, perturbed_maps):
  b = maps.shape[0]
  a = maps.reshape(b, -1).astype(jnp.float32)
  d = a - perturbed_maps.reshape(b, -1).astype(jnp.float32)
  return jnp.linalg.norm(d, axis=1) / jnp.linalg.norm(a, axis=1)


@jax.jit
def _perturb(images, key, radius):
  return images + jax.random.uniform(key, images.shape, jnp.float32,
                                     -radius, radius)


def sensitivity_ratios(explain_fn: ExplainFn, images_BxHxWxC, classes_B,
                       maps_Bxhxw=None, *, radius: float = RADIUS,
                       samples: int = SAMPLES, rng=None,
                       noise_NxBxHxWxC=None) -> np.ndarray:
  """``||a - a_n|| / ||a||`` for each image and noise draw; (B, N).

  Args:
    explain_fn: ``(images, classes) -> maps`` (batched).
    images_BxHxWxC: model inputs.
    classes_B: the class explained.
    maps_Bxhxw: the maps of the unperturbed images (None: ``explain_fn``'s).
    radius: half-width of the uniform noise.
    samples: N.
    rng: key of the noise (default ``jax.random.key(0)``).
    noise_NxBxHxWxC: explicit noise (overrides ``radius``, ``samples``, ``rng``).
  """
  images = jnp.asarray(images_BxHxWxC, jnp.float32)
  classes = jnp.asarray(classes_B, jnp.int32)
  maps = explain_fn(images, classes) if maps_Bxhxw is None else maps_Bxhxw
  maps = jnp.asarray(maps, jnp.float32)
  if noise_NxBxHxWxC is not None:
    noise = jnp.asarray(noise_NxBxHxWxC, jnp.float32)
    perturbed = (images + noise[n] for n in range(noise.shape[0]))
  else:
    key = rng if rng is not None else jax.random.key(0)
    perturbed = (_perturb(images, jax.random.fold_in(key, n), radius)
                 for n in range(samples))
  out = [_ratio(maps, jnp.asarray(explain_fn(x, classes), jnp.float32))
         for x in perturbed]
  return np.asarray(jnp.stack(out, 1))


def max_sensitivity(ratios_BxN) -> np.ndarray:
  """Largest ratio per image (NaN draws left out, as Quantus's nanmax)."""
  return np.nanmax(np.asarray(ratios_BxN, np.float64), axis=1)


def avg_sensitivity(ratios_BxN) -> np.ndarray:
  """Mean ratio per image (NaN draws left out, as Quantus's nanmean)."""
  return np.nanmean(np.asarray(ratios_BxN, np.float64), axis=1)
