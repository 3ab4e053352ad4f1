"""Randomisation sanity checks of saliency maps, batched and jitted.

A map that explains a classifier must change when the classifier's weights
are destroyed (Adebayo et al., "Sanity checks for saliency maps", NeurIPS
2018) and when another class is explained (Sixt et al., "When explanations
lie", ICML 2020). ``randomisation_checks`` runs, for any explainer given as
``explain(variables, images, labels) -> maps (B, H, W)``:

- ``cascading``: the model's layers are re-initialised one more at a time,
  from the classifier down to the stem (top-down); row k has layers 0..k
  randomised.
- ``independent``: each layer alone is re-initialised.
- ``smooth_cascading`` (``smooth_samples > 0``): the cascading test on
  explanations averaged over noisy inputs (Quantus's smooth MPRT).
- ``efficient``: the relative rise of the map's discrete entropy from the
  original model to the fully randomised one (Quantus's efficient MPRT).
- ``random_logit``: the map of a random other class against the map of the
  given class, on the original model.

Each compares maps with the original ones, image by image, with Spearman's
rank correlation (of the maps and of their absolute values), SSIM and the
Pearson correlation of HOG features; docs/explanations.md#randomisation-checks
gives the formulas. Layers (``layer_order``) are the model's top-level
modules in reverse order of execution: the classifier, the head's modules,
then each direct child of the backbone (a ResNet's residual blocks, then the
stem's batch norm and convolution). A layer is re-initialised with the
model's own initialisers (a second ``model.init`` with another key); its
batch statistics go back to their initial values too, as PyTorch's
``reset_parameters`` does for Quantus.

All settings of a test share one compiled program: the randomised variables
are chosen inside it from the original and the re-initialised ones by a
vector of flags, so a new layer set is a new argument, not a new trace.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from brnpa_jax.explain.explainers import DISPLAY_NAMES, EXPLAINERS
from brnpa_jax.train.sharding import data_sharding, replicated

Explain = Callable[[Any, jax.Array, jax.Array], jax.Array]
SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")
TESTS = ("cascading", "independent", "random_logit", "efficient",
         "smooth_cascading")
# skimage.metrics.structural_similarity's defaults (Quantus's ssim).
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03
# skimage.feature.hog's defaults.
HOG_ORIENTATIONS, HOG_CELL, HOG_BLOCK = 9, 8, 3
ENTROPY_BINS = 100  # Quantus's discrete_entropy default


# -- similarity of two maps (one pair; vmapped over images) -----------------------
def average_ranks(x_N: jax.Array) -> jax.Array:
  """Ranks 1..N, tied values sharing the mean of their ranks (scipy's
  ``rankdata(method='average')``)."""
  s = jnp.sort(x_N)
  lo = jnp.searchsorted(s, x_N, side="left")
  hi = jnp.searchsorted(s, x_N, side="right")
  return (lo + hi + 1).astype(jnp.float32) / 2


def pearson(a_N: jax.Array, b_N: jax.Array) -> jax.Array:
  """Pearson correlation; NaN when either vector is constant (as scipy)."""
  a, b = a_N - a_N.mean(), b_N - b_N.mean()
  den = jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))
  return jnp.where(den > 0, jnp.sum(a * b) / jnp.where(den > 0, den, 1.0),
                   jnp.nan)


def spearman(a_HxW: jax.Array, b_HxW: jax.Array) -> jax.Array:
  """Spearman's rank correlation of two maps' pixels (average ranks for ties;
  ``scipy.stats.spearmanr``)."""
  return pearson(average_ranks(a_HxW.ravel()), average_ranks(b_HxW.ravel()))


def ssim(a_HxW: jax.Array, b_HxW: jax.Array, win_size: int = SSIM_WINDOW,
         k1: float = SSIM_K1, k2: float = SSIM_K2) -> jax.Array:
  """Mean structural similarity as ``skimage.metrics.structural_similarity``
  with its defaults and Quantus's data range (max - min over both maps).

  Uniform ``win_size`` windows, sample covariances (``N / (N - 1)``), the
  mean over windows that lie inside the map. NaN when both maps are the same
  constant (a zero data range).
  """
  a, b = a_HxW.astype(jnp.float32), b_HxW.astype(jnp.float32)
  data_range = jnp.maximum(a.max(), b.max()) - jnp.minimum(a.min(), b.min())
  n = win_size * win_size

  def mean(x):  # the mean of each window inside the map
    return lax.reduce_window(x, 0.0, lax.add, (win_size, win_size), (1, 1),
                             "VALID") / n

  ux, uy = mean(a), mean(b)
  cov = n / (n - 1)
  vx = cov * (mean(a * a) - ux * ux)
  vy = cov * (mean(b * b) - uy * uy)
  vxy = cov * (mean(a * b) - ux * uy)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)
       / ((ux * ux + uy * uy + c1) * (vx + vy + c2)))
  return s.mean()


def hog(x_HxW: jax.Array, orientations: int = HOG_ORIENTATIONS,
        cell: int = HOG_CELL, block: int = HOG_BLOCK) -> jax.Array:
  """Histogram-of-oriented-gradients features, as ``skimage.feature.hog``
  with its defaults (9 unsigned orientations, 8x8-pixel cells, 3x3-cell
  blocks, L2-Hys block normalisation, no square root, one channel).

  Central differences (zero on the border rows/columns); each pixel adds its
  gradient magnitude to its orientation's bin (no interpolation); a cell's
  histogram is the mean over its pixels; pixels beyond the last whole cell
  are ignored.

  Returns:
    float32 features, flattened as skimage's (block row, block column, cell
    row, cell column, orientation).
  """
  x = x_HxW.astype(jnp.float32)
  h, w = x.shape
  g_row = jnp.zeros_like(x).at[1:-1, :].set(x[2:, :] - x[:-2, :])
  g_col = jnp.zeros_like(x).at[:, 1:-1].set(x[:, 2:] - x[:, :-2])
  magnitude = jnp.hypot(g_col, g_row)
  angle = jnp.mod(jnp.rad2deg(jnp.arctan2(g_row, g_col)), 180.0)
  bins = jnp.clip(jnp.floor(angle / (180.0 / orientations)), 0,
                  orientations - 1).astype(jnp.int32)
  nr, nc = h // cell, w // cell
  if nr < block or nc < block:
    raise ValueError(f"a {h}x{w} map is too small for HOG's {block}x{block} "
                     f"blocks of {cell}x{cell}-pixel cells.")
  votes = jax.nn.one_hot(bins, orientations) * magnitude[..., None]
  votes = votes[:nr * cell, :nc * cell].reshape(nr, cell, nc, cell, orientations)
  cells = votes.mean(axis=(1, 3))  # (nr, nc, orientations)
  br, bc = nr - block + 1, nc - block + 1
  # blocks[r, c, i, j] = cells[r + i, c + j]: one slice per cell of a block.
  blocks = jnp.stack([cells[i:i + br, j:j + bc] for i in range(block)
                      for j in range(block)], axis=2)
  blocks = blocks.reshape(br, bc, block, block, orientations)
  eps = 1e-5
  norm = lambda v: v / jnp.sqrt(jnp.sum(v * v, axis=(2, 3, 4), keepdims=True)
                                + eps * eps)
  return norm(jnp.minimum(norm(blocks), 0.2)).ravel()


def hog_similarity(a_HxW: jax.Array, b_HxW: jax.Array) -> jax.Array:
  """Pearson correlation of the two maps' HOG features (Adebayo et al.);
  1 - this is the HOG distance."""
  return pearson(hog(a_HxW), hog(b_HxW))


def similarities(ref_BxHxW: jax.Array, maps_BxHxW: jax.Array
                 ) -> dict[str, jax.Array]:
  """Per image, each of ``SIMILARITIES`` between two batches of maps."""
  pair = lambda a, b: {"spearman": spearman(a, b),
                       "spearman_abs": spearman(jnp.abs(a), jnp.abs(b)),
                       "ssim": ssim(a, b), "hog": hog_similarity(a, b)}
  return jax.vmap(pair)(ref_BxHxW.astype(jnp.float32),
                        maps_BxHxW.astype(jnp.float32))


def discrete_entropy(x_HxW: jax.Array, bins: int = ENTROPY_BINS) -> jax.Array:
  """Entropy (nats) of the histogram of a map's values in ``bins`` equal bins
  from its minimum to its maximum (Quantus's ``discrete_entropy``:
  ``numpy.histogram`` then ``scipy.stats.entropy``); 0 for a constant map."""
  x = x_HxW.ravel().astype(jnp.float32)
  lo, hi = x.min(), x.max()
  span = jnp.where(hi > lo, hi - lo, 1.0)
  idx = jnp.clip(jnp.floor((x - lo) / span * bins), 0, bins - 1).astype(jnp.int32)
  p = jnp.zeros(bins).at[idx].add(1.0) / x.size
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


# -- layers -------------------------------------------------------------------------
def _block_of(path: tuple[str, ...]) -> tuple[str, ...]:
  """A parameter's layer: the backbone's direct child, else the top module."""
  return path[:2] if path[0] == "backbone" and len(path) > 1 else path[:1]


def layer_order(model: nn.Module, variables, images) -> list[str]:
  """The model's layers that hold parameters, top first ('/'-joined paths).

  The order is the reverse of the order in which the modules first run on
  ``images`` (traced abstractly, nothing is computed).
  """
  calls: list[tuple[str, ...]] = []

  def record(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if path not in calls:
      calls.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, images[:1])
  first = {p: i for i, p in reversed(list(enumerate(calls)))}
  blocks = {_block_of(tuple(k.key for k in path))
            for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}
  # A parameter directly under a module (ViT's pos_embed) runs with it.
  when = lambda b: first.get(b, first.get(b[:-1], -1))
  return ["/".join(b) for b in sorted(blocks, key=when, reverse=True)]


def _leaf_layers(variables, layers: Sequence[str]):
  """Per leaf of ``variables``, the index of its layer in ``layers`` (-1: in
  none). The collection's name (params, batch_stats) is not part of the path."""
  index = {tuple(l.split("/")): i for i, l in enumerate(layers)}

  def of(path, _):
    keys = tuple(k.key for k in path[1:])
    for n in range(len(keys), 0, -1):
      if keys[:n] in index:
        return index[keys[:n]]
    return -1

  return jax.tree_util.tree_map_with_path(of, variables)


def _mixed(original, fresh, leaf_layers, chosen_L):
  """``original`` with the leaves of the chosen layers taken from ``fresh``."""
  pick = lambda o, f, i: o if i < 0 else jnp.where(chosen_L[i], f, o)
  return jax.tree.map(pick, original, fresh, leaf_layers)


def settings(test: str, num_layers: int) -> np.ndarray:
  """The layer flags of each row of a test: (rows, num_layers) bool."""
  if test in ("cascading", "smooth_cascading"):
    return np.tril(np.ones((num_layers, num_layers), bool))
  if test == "independent":
    return np.eye(num_layers, dtype=bool)
  raise ValueError(f"no layer settings for {test!r}.")


# -- explainers -----------------------------------------------------------------
def explainer(method: str, model, *, rng=None, **options) -> Explain:
  """``EXPLAINERS[method]`` as ``explain(variables, images, labels) -> maps``
  (a fixed ``rng``: the same masks or noise for every model)."""
  if method not in EXPLAINERS:
    raise ValueError(f"unknown explainer {method!r}; known: {sorted(EXPLAINERS)}.")
  rng = jax.random.key(0) if rng is None else rng
  fn = functools.partial(EXPLAINERS[method], model, **options)
  return lambda variables, images, labels: fn(variables, images, labels, rng)


def smoothed(explain: Explain, samples: int, noise_magnitude: float,
             rng) -> Explain:
  """Quantus's smooth MPRT explanation: the mean of the maps of ``samples - 1``
  noisy copies ``x + N(0, (noise_magnitude (max x - min x))^2)`` (per image)
  and of ``x`` itself; the same noise for every model."""

  def smooth(variables, images, labels):
    span = images.max(axis=(1, 2, 3), keepdims=True) - images.min(
        axis=(1, 2, 3), keepdims=True)

    def step(total, i):
      noise = jax.random.normal(jax.random.fold_in(rng, i), images.shape)
      noise = jnp.where(i < samples - 1, noise * noise_magnitude * span, 0.0)
      return total + explain(variables, images + noise, labels), None

    zero = jnp.zeros(images.shape[:3], jnp.float32)
    total, _ = lax.scan(step, zero, jnp.arange(samples))
    return total / samples

  return smooth


def other_labels(labels_B, num_classes: int, rng) -> jax.Array:
  """A uniformly drawn class other than each label (the random-logit test)."""
  off = jax.random.randint(rng, labels_B.shape, 1, num_classes)
  return (labels_B + off) % num_classes


# -- the checks ---------------------------------------------------------------------
def _program(explain: Explain, leaf_layers, bins: int):
  """One jitted program for every layer set of one explainer: the maps of the
  model whose chosen layers are re-initialised, their entropy, and their
  similarity to ``ref``."""

  @jax.jit
  def maps_of(original, fresh, chosen_L, images, labels):
    maps = explain(_mixed(original, fresh, leaf_layers, chosen_L), images, labels)
    maps = maps.astype(jnp.float32)
    return maps, jax.vmap(functools.partial(discrete_entropy, bins=bins))(maps)

  def run(original, fresh, chosen_L, images, labels, ref):
    maps, entropy = maps_of(original, fresh, chosen_L, images, labels)
    return maps, _similarities(ref, maps), entropy

  return run


# A program of its own, on stored maps: inside the explainer's program XLA
# fuses the two maps' HOG differently, and the rounding of near-zero
# gradients, magnified by the block normalisation, made equal maps 0.998
# similar.
_similarities = jax.jit(similarities)


def _fresh_variables(model, variables, images, rng):
  """The model's variables re-initialised with its own initialisers."""
  fresh = jax.jit(model.init)(rng, jnp.asarray(images[:1]))
  fresh = {k: fresh[k] for k in variables}
  if jax.tree.structure(fresh) != jax.tree.structure(dict(variables)):
    raise ValueError("model.init gives another variable tree than the run's; "
                     "cannot re-initialise its layers.")
  return jax.tree.map(lambda f, o: f.astype(o.dtype), fresh, dict(variables))


def randomisation_checks(run, images, labels, methods, *,
                         options: Mapping[str, Mapping[str, Any]] | None = None,
                         tests: Sequence[str] = ("cascading", "independent",
                                                 "random_logit", "efficient"),
                         layers: Sequence[str] | None = None,
                         smooth_samples: int = 10, noise_magnitude: float = 0.1,
                         bins: int = ENTROPY_BINS, seed: int = 0, rng=None,
                         batch_size: int = 16, mesh=None,
                         figure_images: int = 1) -> dict[str, Any]:
  """Model-parameter randomisation and random-logit tests of several methods.

  Args:
    run: a restored run: ``run.model`` (a ``Classifier``), ``run.variables``.
    images: (N, H, W, 3) model inputs (normalised).
    labels: (N,) the classes to explain (e.g. the original model's
      predictions); the same classes are explained on every randomised model.
    methods: names of ``EXPLAINERS`` (``own`` is the run's own map), or a
      mapping name -> ``explain(variables, images, labels) -> maps (B, H, W)``.
    options: per method name, the explainer's options (``chunk``, ...).
    tests: a subset of ``TESTS``.
    layers: the layers, top first (default ``layer_order``).
    smooth_samples, noise_magnitude: smooth MPRT's samples per map (the last
      one without noise) and noise standard deviation relative to each
      image's value range (Quantus's defaults are 50 and 0.1).
    bins: histogram bins of the entropy (efficient MPRT).
    seed: of the re-initialisation, the random other classes, the
      explainers' randomness and the smoothing noise (``jax.random.key(seed)``
      folded with 0, 1, 2 and 3).
    rng: a key to use instead of ``jax.random.key(seed)`` (another PRNG
      implementation, e.g. ``rbg``, compiles the re-initialisation faster).
    batch_size: images per program call (rounded up to a multiple of the
      mesh's devices).
    mesh: a ``jax.sharding.Mesh``: images are split over its devices, the
      variables replicated; None runs on the default device.
    figure_images: cascading maps of the first images kept for the figure.

  Returns:
    ``layers``; per test in ``tests`` and method, a dict of per-image
    arrays: ``cascading``, ``independent``, ``smooth_cascading``: each of
    ``SIMILARITIES`` (rows = layers, N); ``random_logit``: each of
    ``SIMILARITIES`` (N,); ``efficient``: ``entropy_rise`` (N,) =
    (H(randomised) - H(original)) / H(original), with ``entropy_original``
    and ``entropy_randomised``. ``maps``: per method, the maps of the first
    ``figure_images`` images on the original model then after each
    cascading step (1 + layers, n, H, W); ``labels`` and ``other_labels``.
  """
  unknown = sorted(set(tests) - set(TESTS))
  if unknown:
    raise ValueError(f"unknown test(s) {unknown}; known: {TESTS}.")
  model, variables = run.model, dict(run.variables)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  n = len(images)
  if labels.shape != (n,):
    raise ValueError(f"labels must be ({n},), got {labels.shape}.")
  if layers is None:
    layers = layer_order(model, variables, images)
  layers = list(layers)
  rng = jax.random.key(seed) if rng is None else rng
  explains = (dict(methods) if isinstance(methods, Mapping) else
              {m: explainer(m, model, rng=jax.random.fold_in(rng, 2),
                            **dict((options or {}).get(m, {})))
               for m in methods})
  fresh = _fresh_variables(model, variables, images, jax.random.fold_in(rng, 0))
  leaf_layers = _leaf_layers(variables, layers)
  other = np.asarray(other_labels(jnp.asarray(labels), model.num_classes,
                                  jax.random.fold_in(rng, 1)))
  devices = mesh.size if mesh is not None else 1
  batch = -(-min(batch_size, n) // devices) * devices
  place = ((lambda x: jax.device_put(x, data_sharding(mesh))) if mesh is not None
           else jnp.asarray)
  if mesh is not None:
    variables, fresh = jax.device_put((variables, fresh), replicated(mesh))

  rows = {t: settings(t, len(layers)) for t in ("cascading", "independent",
                                                "smooth_cascading") if t in tests}
  if "efficient" in tests and "cascading" not in rows:
    rows["cascading"] = settings("cascading", len(layers))[-1:]
  out: dict[str, Any] = {"layers": layers, "labels": labels, "other_labels": other,
                         "maps": {}}
  for name, explain in explains.items():
    programs = {"plain": _program(explain, leaf_layers, bins)}
    if "smooth_cascading" in tests:
      programs["smooth"] = _program(
          smoothed(explain, smooth_samples, noise_magnitude,
                   jax.random.fold_in(rng, 3)), leaf_layers, bins)
    parts: dict[str, list] = {}
    for start in range(0, n, batch):
      stop = min(start + batch, n)
      pad = lambda x: np.concatenate([x[start:stop]] + [x[stop - 1:stop]] *
                                     (batch - (stop - start)))
      x, y, y_other = place(pad(images)), place(pad(labels)), place(pad(other))
      none = jnp.zeros(len(layers), bool)
      keep = lambda a: np.asarray(a)[:stop - start]
      plain = programs["plain"]
      zeros = place(np.zeros(x.shape[:3], np.float32))  # no reference yet
      ref, _, h0 = plain(variables, fresh, none, x, y, zeros)
      ref = place(ref)
      parts.setdefault("entropy_original", []).append(keep(h0))
      if "random_logit" in tests:
        _, sims, _ = plain(variables, fresh, none, x, y_other, ref)
        parts.setdefault("random_logit", []).append(
            {k: keep(v) for k, v in sims.items()})
      figure_maps = [keep(ref)[:figure_images]] if start == 0 else None
      for test, flags in rows.items():
        program = programs["smooth" if test == "smooth_cascading" else "plain"]
        reference = ref
        if test == "smooth_cascading":
          reference = place(program(variables, fresh, none, x, y, ref)[0])
        per_row = []
        for chosen in flags:
          maps, sims, h = program(variables, fresh, jnp.asarray(chosen), x, y,
                                  reference)
          per_row.append({k: keep(v) for k, v in sims.items()})
          if test == "cascading" and figure_maps is not None:
            figure_maps.append(keep(maps)[:figure_images])
        if test == "cascading":
          parts.setdefault("entropy_randomised", []).append(keep(h))
        parts.setdefault(test, []).append(
            {k: np.stack([r[k] for r in per_row]) for k in SIMILARITIES})
      if figure_maps is not None and "cascading" in tests:
        out["maps"][name] = np.stack(figure_maps)
    for test in ("cascading", "independent", "smooth_cascading", "random_logit"):
      if test in tests:
        out.setdefault(test, {})[name] = {
            k: np.concatenate([p[k] for p in parts[test]], axis=-1)
            for k in SIMILARITIES}
    if "efficient" in tests:
      h0 = np.concatenate(parts["entropy_original"])
      h1 = np.concatenate(parts["entropy_randomised"])
      with np.errstate(divide="ignore", invalid="ignore"):
        rise = np.where(h0 > 0, (h1 - h0) / h0, np.nan)
      out.setdefault("efficient", {})[name] = {
          "entropy_rise": rise, "entropy_original": h0, "entropy_randomised": h1}
  return out


def summarise(result: Mapping[str, Any], level: float = 0.95
              ) -> list[dict[str, Any]]:
  """One row per (method, test, layer, measure): the mean over images with
  the half-width of its t confidence interval, and the number of images with
  a finite value (a constant map has no rank correlation)."""
  from scipy import stats  # scipy comes with jax
  rows = []

  def add(method, test, layer, measure, values):
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    mean = float(v.mean()) if len(v) else float("nan")
    half = (float(stats.t.ppf(0.5 + level / 2, len(v) - 1)
                  * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)
    rows.append({"method": method, "test": test, "layer": layer,
                 "measure": measure, "n": len(v), "mean": mean, "ci95": half})

  layers = result["layers"]
  for test in ("cascading", "independent", "smooth_cascading"):
    for method, sims in result.get(test, {}).items():
      for measure, values in sims.items():
        for i, layer in enumerate(layers):
          add(method, test, layer, measure, values[i])
  for method, sims in result.get("random_logit", {}).items():
    for measure, values in sims.items():
      add(method, "random_logit", "", measure, values)
  for method, values in result.get("efficient", {}).items():
    add(method, "efficient", "", "entropy_rise", values["entropy_rise"])
  return rows


def save_randomisation_figure(path: str, image_HxWx3: np.ndarray,
                              result: Mapping[str, Any], index: int = 0,
                              alpha: float = 0.5) -> str:
  """The maps of one image as the layers are randomised (cascading), per
  method: rows are methods, columns the image, the original model's map and
  one per cascading step (the layers named are randomised down to there).

  Args:
    path: output PNG.
    image_HxWx3: the image, uint8 (``data.transforms.denormalize``).
    result: ``randomisation_checks``'s (with the cascading test).
    index: which of the kept figure images.
    alpha: opacity of the heat maps.
  """
  return save_randomisation_figures(path, [("", image_HxWx3, result)], index,
                                    alpha)


def save_randomisation_figures(path: str, runs: Sequence[tuple[str, Any, Any]],
                               index: int = 0, alpha: float = 0.5) -> str:
  """``save_randomisation_figure`` of several runs in one PNG: the rows of
  each run in turn, titled ``name: method`` (``name`` empty: the method),
  with its layers as the column titles of its first row.

  Args:
    path: output PNG.
    runs: ``(name, image_HxWx3 uint8, result)`` per run.
    index, alpha: as ``save_randomisation_figure``.
  """
  from brnpa_jax.explain import plots  # noqa: F401  (Agg backend first)
  import matplotlib.pyplot as plt
  from brnpa_jax.explain.overlay import heat_overlay, save_figure

  rows = [(name, image, result, method, m) for name, image, result in runs
          for method, m in result["maps"].items()]
  if not rows:
    raise ValueError("the result holds no cascading maps: run the cascading "
                     "test with figure_images >= 1.")
  cols = 2 + max(len(r[2]["layers"]) for r in rows)
  fig, axes = plt.subplots(len(rows), cols, squeeze=False,
                           figsize=(plots.PANEL_INCHES * cols,
                                    plots.PANEL_INCHES * len(rows) + 0.3))
  for i, (name, image, result, method, m) in enumerate(rows):
    titles = ["original"] + [f"to {l}" for l in result["layers"]]
    label = DISPLAY_NAMES.get(method, method)
    axes[i, 0].imshow(image)
    axes[i, 0].set_title(f"{name}: {label}" if name else label, fontsize=7)
    for j in range(len(titles)):
      heat = np.asarray(m[j, index], np.float64)
      span = heat.max() - heat.min()
      heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
      axes[i, j + 1].imshow(heat_overlay(image, heat, alpha))
      if i == 0 or rows[i - 1][2] is not result:
        axes[i, j + 1].set_title(titles[j], fontsize=6)
  for ax in axes.ravel():
    ax.axis("off")
  fig.tight_layout(pad=0.3, h_pad=0.8)
  return save_figure(fig, path, plots.DPI)
