"""A procedural fine-grained dataset: classes differ only by small parts.

Every image shows one large object (a rotated, shaded ellipse of random
colour) on a textured background with clutter. Small glyphs (cross, ring,
triangle, ...) sit on the object; the class is the unordered set of glyph
*types* on it (by default a pair of distinct types), nothing else. Glyph
positions, sizes and colours, the object, the background and the clutter are
drawn independently of the class, and every class carries the same number of
glyphs of near-equal area (one extra glyph type, ``disc``, is shared by all
classes), so global colour and shape statistics do not reveal the class: a
model has to find and recognise the parts. ``part_mask`` is the union of the
discriminative glyphs, which makes the set a localisation benchmark for
attention maps.

Generation is pure numpy and order-independent: example ``i`` of a split is
drawn from ``np.random.default_rng([seed, split_id, i])`` alone, so any example
can be regenerated on its own (and in parallel). Shapes are rendered from
signed distance functions with one pixel of anti-aliasing, on small patches
around each shape, which keeps a 64x64 image well under a millisecond.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable

import numpy as np

# Bump when the output for the same parameters changes: it is the TFDS
# version of ``brnpa_parts``, so stale builds are never read back.
GENERATOR_VERSION = 1

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
# Examples per split of the embedded dataset as the default config builds it.
DEFAULT_SPLIT_SIZES = {"train": 6000, "validation": 1000, "test": 1000}

# Glyph types in the order they are handed to classes: the first ones are the
# most distinct from each other, so small class counts use the easy shapes.
PART_TYPES = ("cross", "ring", "triangle", "square", "bar", "diamond",
              "xcross", "vbar")
# On the object in every class: its glyph count and area match every class,
# so "how many glyphs, how much glyph area" carries no label information.
SHARED_TYPE = "disc"

# Colours of glyphs, independent of the class; picked per glyph among those
# that contrast with the object.
PALETTE = np.array([
    [0.90, 0.10, 0.10], [0.10, 0.75, 0.15], [0.15, 0.25, 0.95],
    [0.95, 0.90, 0.10], [0.10, 0.85, 0.90], [0.90, 0.15, 0.85],
    [0.97, 0.97, 0.97], [0.05, 0.05, 0.05], [0.98, 0.55, 0.05],
    [0.50, 0.15, 0.70],
], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class PartsConfig:
  """Parameters of the generator; the defaults are the default dataset.

  Attributes:
    image_size: side of the square images, in pixels.
    num_classes: number of classes (at most C(num_part_types, parts_per_class)).
    parts_per_class: glyph types per class (an unordered set of this size).
    num_part_types: glyph types used by the classes; None takes the fewest
      that give ``num_classes`` distinct sets (5 for 10 classes of pairs).
    glyph_size: (min, max) nominal glyph diameter, as a fraction of the side
      (0.16-0.25 is 10-16 px at 64 px).
    num_shared: glyphs of the shared type (``disc``) added on the object in
      every class: a distractor that raises difficulty a lot (a ResNet-18
      reaches ~83% instead of ~97% in the same budget with 1).
    num_clutter: shapes in the background (partly hidden by the object).
    num_decoys: glyphs of random part types placed *off* the object: the
      hardest knob, as they force a model to look at the object only.
    object_size: (min, max) semi-major axis of the object, fraction of side.
    noise: standard deviation of per-pixel Gaussian noise ([0, 1] scale).
    texture: amplitude of the low-frequency background texture.
    margin: glyphs on the object stay inside ``[margin, 1 - margin]`` of the
      image (the default keeps them in the central 85%).
    seed: dataset seed.
  """

  image_size: int = 64
  num_classes: int = 10
  parts_per_class: int = 2
  num_part_types: int | None = None
  glyph_size: tuple[float, float] = (0.16, 0.25)
  num_shared: int = 0
  num_clutter: int = 4
  num_decoys: int = 0
  object_size: tuple[float, float] = (0.32, 0.42)
  noise: float = 0.03
  texture: float = 0.15
  margin: float = 0.075
  seed: int = 0


def class_part_types(cfg: PartsConfig) -> tuple[tuple[str, ...], ...]:
  """Returns, for each class, the glyph types that define it.

  Args:
    cfg: generator parameters.

  Returns:
    ``num_classes`` tuples of ``parts_per_class`` type names.

  Raises:
    ValueError: if the types cannot give ``num_classes`` distinct sets.
  """
  k = cfg.parts_per_class
  n = cfg.num_part_types
  if n is None:
    n = next((n for n in range(k, len(PART_TYPES) + 1)
              if math.comb(n, k) >= cfg.num_classes), len(PART_TYPES))
  if not k <= n <= len(PART_TYPES):
    raise ValueError(f"num_part_types={n} must be in [{k}, {len(PART_TYPES)}].")
  combos = list(itertools.combinations(PART_TYPES[:n], k))
  if cfg.num_classes > len(combos) or cfg.num_classes < 2:
    raise ValueError(
        f"num_classes={cfg.num_classes} needs 2..{len(combos)} with "
        f"{n} part types and parts_per_class={k}.")
  return tuple(combos[:cfg.num_classes])


# ---------------------------------------------------------------------------
# Signed distance functions (pixels; negative inside). ``r`` is half the
# nominal glyph size; the proportions give every glyph an area of about
# 1.8 r^2 (measured in the tests), so glyph area carries no class signal.


def _box(x, y, hx, hy):
  qx, qy = np.abs(x) - hx, np.abs(y) - hy
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0)


def _cross(x, y, r):
  return np.minimum(_box(x, y, r, 0.257 * r), _box(x, y, 0.257 * r, r))


def _triangle(x, y, r):
  # Equilateral, apex up (image y grows downwards), circumradius 1.18 r.
  big_r = 1.18 * r
  c, s = math.sqrt(3) / 2, 0.5
  edges = np.maximum(np.maximum(y, -c * x - s * y), c * x - s * y)
  return edges - big_r / 2


_S2 = 1 / math.sqrt(2)
# type -> (sdf, bounding radius in units of r)
_GLYPHS: dict[str, tuple[Callable, float]] = {
    "cross": (_cross, 1.04),
    "xcross": (lambda x, y, r: _cross((x + y) * _S2, (x - y) * _S2, r), 1.04),
    "ring": (lambda x, y, r: np.abs(np.hypot(x, y) - 0.762 * r) - 0.188 * r,
             0.95),
    "triangle": (_triangle, 1.18),
    "square": (lambda x, y, r: _box(x, y, 0.67 * r, 0.67 * r), 0.95),
    "diamond": (lambda x, y, r: (np.abs(x) + np.abs(y) - 0.95 * r) * _S2, 0.95),
    "bar": (lambda x, y, r: _box(x, y, 1.16 * r, 0.387 * r), 1.23),
    "vbar": (lambda x, y, r: _box(x, y, 0.387 * r, 1.16 * r), 1.23),
    "disc": (lambda x, y, r: np.hypot(x, y) - 0.757 * r, 0.76),
}

# Bounding radius used to place every glyph type (see generate_example).
_PLACE_EXT = max(ext for _, ext in _GLYPHS.values())


def _ellipse(x, y, a, b, theta):
  """First-order signed distance to a rotated ellipse (exact on its rim)."""
  c, s = math.cos(theta), math.sin(theta)
  u, v = c * x + s * y, -s * x + c * y
  q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
  grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) / np.maximum(q, 1e-6)
  return (q - 1) / np.maximum(grad, 1e-6)


def _capsule(x, y, half_len, half_width, theta):
  c, s = math.cos(theta), math.sin(theta)
  u, v = c * x + s * y, -s * x + c * y
  return np.hypot(np.maximum(np.abs(u) - half_len, 0), v) - half_width


def _paint(canvas, cx, cy, ext, sdf, colour, mask=None):
  """Alpha-blends ``colour`` where ``sdf`` < 0, on the patch around (cx, cy)."""
  size = canvas.shape[0]
  x0, x1 = max(int(cx - ext) - 1, 0), min(int(cx + ext) + 2, size)
  y0, y1 = max(int(cy - ext) - 1, 0), min(int(cy + ext) + 2, size)
  if x0 >= x1 or y0 >= y1:
    return
  xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
  ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
  alpha = np.clip(0.5 - sdf(xs, ys), 0.0, 1.0)
  patch = canvas[y0:y1, x0:x1]
  patch += alpha[..., None] * (colour - patch)
  if mask is not None:
    mask[y0:y1, x0:x1] |= alpha > 0.5


@functools.lru_cache(maxsize=8)
def _upsampler(size: int, knots: int) -> np.ndarray:
  """(size, knots) matrix of linear interpolation weights."""
  pos = (np.arange(size) + 0.5) / size * (knots - 1)
  return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(knots)[None, :])
                    ).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
  return np.mgrid[0:size, 0:size].astype(np.float32) + 0.5


def _contrasting(rng, ref, min_dist, candidates=None):
  """A colour at least ``min_dist`` (RGB, Euclidean) from ``ref``."""
  for _ in range(32):
    if candidates is None:
      colour = rng.random(3, dtype=np.float32)
    else:
      colour = candidates[rng.integers(len(candidates))]
    if np.linalg.norm(colour - ref) >= min_dist:
      return colour
  # Rarely reached: the farthest candidate, or the farthest RGB corner.
  if candidates is None:
    return np.where(ref < 0.5, 1.0, 0.0).astype(np.float32)
  return candidates[np.argmax(np.linalg.norm(candidates - ref, axis=1))]


# 16 points on the unit circle: the rim of a glyph's bounding disc.
_RIM = np.stack([np.cos(np.arange(16) * np.pi / 8),
                 np.sin(np.arange(16) * np.pi / 8)])


def _place_on_object(rng, cfg, ell, ext, placed, tries=128):
  """Samples a centre for a glyph of bounding radius ``ext`` on the object.

  The disc of radius ``ext`` must lie inside the object and the margin and
  clear of the ``placed`` (x, y, ext) discs. ``tries`` candidates are drawn
  at once and the first valid one is kept; None if none is.
  """
  size = cfg.image_size
  cx, cy, a, b, theta = ell
  c, s = math.cos(theta), math.sin(theta)
  rho, phi = np.sqrt(rng.random(tries)), 2 * np.pi * rng.random(tries)
  u = max(a - ext, 0) * rho * np.cos(phi)
  v = max(b - ext, 0) * rho * np.sin(phi)
  px, py = cx + c * u - s * v, cy + s * u + c * v
  lo, hi = cfg.margin * size + ext, (1 - cfg.margin) * size - ext
  ok = (px >= lo) & (px <= hi) & (py >= lo) & (py <= hi)
  for qx, qy, qe in placed:
    ok &= np.hypot(px - qx, py - qy) >= ext + qe + 1.5
  # The sampled ellipse shrinks each axis by ext, which is not quite the
  # inner parallel curve; check the disc's rim against the object exactly.
  x = (px - cx)[:, None] + (ext + 0.5) * _RIM[0]
  y = (py - cy)[:, None] + (ext + 0.5) * _RIM[1]
  ru, rv = c * x + s * y, -s * x + c * y
  ok &= ((ru / a) ** 2 + (rv / b) ** 2 <= 1.0).all(axis=1)
  hits = np.flatnonzero(ok)
  return (float(px[hits[0]]), float(py[hits[0]])) if hits.size else None


def _place_off_object(rng, size, ell, ext, tries=64):
  """Samples a centre for a glyph of bounding radius ``ext`` off the object."""
  cx, cy, a, b, theta = ell
  c, s = math.cos(theta), math.sin(theta)
  px, py = rng.uniform(ext, size - ext, (2, tries))
  x = (px - cx)[:, None] + (ext + 1) * _RIM[0]
  y = (py - cy)[:, None] + (ext + 1) * _RIM[1]
  ru, rv = c * x + s * y, -s * x + c * y
  centre_u = c * (px - cx) + s * (py - cy)
  centre_v = -s * (px - cx) + c * (py - cy)
  ok = ((ru / a) ** 2 + (rv / b) ** 2 > 1.0).all(axis=1)
  ok &= (centre_u / a) ** 2 + (centre_v / b) ** 2 > 1.0
  hits = np.flatnonzero(ok)
  return (float(px[hits[0]]), float(py[hits[0]])) if hits.size else None


def generate_example(cfg: PartsConfig, split: str, index: int
                     ) -> dict[str, np.ndarray | int]:
  """Generates one example, a pure function of (cfg, split, index).

  Args:
    cfg: generator parameters.
    split: ``train``, ``validation`` or ``test``.
    index: example index within the split.

  Returns:
    A dict with ``image`` uint8 (S, S, 3), ``label`` int (``index %
    num_classes``, so every prefix of a split is balanced), ``object_mask`` and
    ``part_mask`` uint8 (S, S) in {0, 1}.
  """
  classes = class_part_types(cfg)
  size = cfg.image_size
  rng = np.random.default_rng([cfg.seed, SPLIT_IDS[split], index])
  label = index % cfg.num_classes

  # Background: base colour plus low-frequency texture plus clutter.
  bg = rng.random(3, dtype=np.float32)
  up = _upsampler(size, 6)
  knots = rng.uniform(-1, 1, (3, 6, 6)).astype(np.float32)
  image = bg + cfg.texture * (up @ knots @ up.T).transpose(1, 2, 0)
  for _ in range(cfg.num_clutter):
    px, py = rng.uniform(0, size, 2)
    length, theta = rng.uniform(0.10, 0.20) * size, rng.uniform(0, np.pi)
    width = length * rng.uniform(0.25, 0.6)
    if rng.random() < 0.5:
      sdf = functools.partial(_ellipse, a=length, b=width, theta=theta)
    else:
      sdf = lambda x, y, l=length, w=width / 3, t=theta: _capsule(x, y, l, w, t)
    _paint(image, px, py, length + 1, sdf, rng.random(3, dtype=np.float32))

  # The object: a shaded ellipse near the centre.
  a = rng.uniform(*cfg.object_size) * size
  ell = (size / 2 + rng.uniform(-0.08, 0.08) * size,
         size / 2 + rng.uniform(-0.08, 0.08) * size,
         a, a * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
  obj_colour = _contrasting(rng, bg, 0.45)
  ys, xs = _pixel_centres(size)
  alpha = np.clip(0.5 - _ellipse(xs - ell[0], ys - ell[1], *ell[2:]), 0, 1)
  shade_dir = rng.normal(size=2)
  shade = 0.15 * ((xs - ell[0]) * shade_dir[0] + (ys - ell[1]) * shade_dir[1]) / (
      a * np.linalg.norm(shade_dir) + 1e-6)
  obj = np.clip(obj_colour * (1 + shade[..., None]), 0, 1)
  image += alpha[..., None] * (obj - image)
  object_mask = alpha > 0.5

  # Glyphs on the object: the class's types plus the shared type.
  part_mask = np.zeros((size, size), bool)
  kinds = list(classes[label]) + [SHARED_TYPE] * cfg.num_shared
  placed = []
  for i in rng.permutation(len(kinds)):
    sdf, ext_unit = _GLYPHS[kinds[i]]
    r = rng.uniform(*cfg.glyph_size) * size / 2
    spot = None
    while spot is None and r > 1.5:
      # Placed by the largest type's extent, not this type's: how often a
      # glyph must shrink to fit then does not depend on its type (the class).
      spot = _place_on_object(rng, cfg, ell, _PLACE_EXT * r, placed)
      if spot is None:
        r *= 0.9  # crowded object: shrink rather than overlap or leave it out
    if spot is None:
      raise RuntimeError(f"Could not place glyph {kinds[i]} (cfg={cfg}).")
    placed.append((*spot, _PLACE_EXT * r))
    colour = _contrasting(rng, obj_colour, 0.5, PALETTE)
    is_part = kinds[i] != SHARED_TYPE
    _paint(image, *spot, ext_unit * r, functools.partial(sdf, r=r), colour,
           part_mask if is_part else None)

  # Decoys: part-type glyphs off the object, carrying no class information.
  num_types = len({t for c in classes for t in c})
  for _ in range(cfg.num_decoys):
    sdf, ext_unit = _GLYPHS[PART_TYPES[rng.integers(num_types)]]
    r = rng.uniform(*cfg.glyph_size) * size / 2
    spot = _place_off_object(rng, size, ell, ext_unit * r)
    if spot is not None:  # no room beside a large object: fewer decoys
      _paint(image, *spot, ext_unit * r, functools.partial(sdf, r=r),
             _contrasting(rng, bg, 0.5, PALETTE))

  image += cfg.noise * rng.standard_normal(image.shape, dtype=np.float32)
  return {
      "image": np.round(np.clip(image, 0, 1) * 255).astype(np.uint8),
      "label": label,
      "object_mask": object_mask.astype(np.uint8),
      "part_mask": part_mask.astype(np.uint8),
  }


def generate_split(cfg: PartsConfig, split: str, num: int, start: int = 0
                   ) -> dict[str, np.ndarray]:
  """Generates examples ``start .. start + num - 1`` of a split, stacked.

  Args:
    cfg: generator parameters.
    split: ``train``, ``validation`` or ``test``.
    num: number of examples.
    start: index of the first example.

  Returns:
    Dict of stacked arrays: ``image`` (num, S, S, 3) uint8, ``label`` (num,)
    int32, ``object_mask``/``part_mask`` (num, S, S) uint8, ``id`` (num,) int64.
  """
  examples = [generate_example(cfg, split, i) for i in range(start, start + num)]
  out = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  out["label"] = out["label"].astype(np.int32)
  out["id"] = np.arange(start, start + num, dtype=np.int64)
  return out
