"""Person re-identification data: Market-1501 and DukeMTMC-reID folders.

Both datasets ship as three folders of cropped pedestrians,
``bounding_box_train/`` (training), ``query/`` and ``bounding_box_test/``
(the gallery), and encode identity and camera in each file name:

  Market-1501   ``0002_c1s1_000451_03.jpg``: identity 2, camera 1, sequence 1,
                frame 451, box 3 (cameras c1..c6);
  DukeMTMC-reID ``0001_c2_f0046182.jpg``: identity 1, camera 2, frame 46182
                (cameras c1..c8).

The standard protocol: identity ``-1`` marks junk boxes (partial or bad
detections) and ``0000`` distractors (background, other people). Training
uses neither; the gallery keeps distractors (as negatives) and drops junk;
queries never hold either. Training identities are relabelled ``0..N-1``.

Images are decoded by ``image_files.read_image`` (RGB) and augmented in
numpy with generators seeded from (seed, epoch, step, row), so an epoch is
reproducible whatever the thread scheduling. Training batches follow the
identity-balanced P x K sampler of ``pk_batches``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from typing import Iterator

import numpy as np
from PIL import Image

from brnpa_jax.data import image_files
from brnpa_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize

FOLDERS = {"train": "bounding_box_train", "query": "query",
           "gallery": "bounding_box_test"}
JUNK, DISTRACTOR = -1, 0
NAME_PATTERNS = {
    "market1501": re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.jpg$"),
    "dukemtmc": re.compile(r"^(-?\d+)_c(\d+)_f(\d+)\.jpg$"),
}
NAME_EXAMPLES = {"market1501": "0002_c1s1_000451_03.jpg",
                 "dukemtmc": "0001_c2_f0046182.jpg"}
# Folder names the archives unpack to; ``data_dir`` may be the dataset's own
# folder or one that holds it under one of these names.
DATASET_DIRS = {"market1501": ("Market-1501-v15.09.15", "Market-1501", "market1501"),
                "dukemtmc": ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmc")}
LAYOUT = """<data_dir>/                 (or <data_dir>/{names}/)
  bounding_box_train/  training images, e.g. {example}
  query/               query images
  bounding_box_test/   gallery images"""


@dataclasses.dataclass(frozen=True)
class ReIDName:
  """What a file name says: identity (-1 junk, 0 distractor) and camera."""
  identity: int
  camera: int


def parse_name(filename: str, dataset: str) -> ReIDName | None:
  """Identity and camera from a Market-1501 or DukeMTMC-reID file name.

  Args:
    filename: base name, e.g. ``0002_c1s1_000451_03.jpg``.
    dataset: ``market1501`` or ``dukemtmc``.

  Returns:
    The parsed name, or None for a file that is not a JPEG (the archives
    carry ``Thumbs.db``).

  Raises:
    ValueError: a JPEG whose name does not follow the dataset's scheme.
  """
  if dataset not in NAME_PATTERNS:
    raise ValueError(f"Unknown re-id dataset {dataset!r}; valid: {sorted(NAME_PATTERNS)}.")
  if not filename.lower().endswith(".jpg"):
    return None
  m = NAME_PATTERNS[dataset].match(filename)
  if m is None:
    raise ValueError(f"{filename!r} is not a {dataset} file name (expected names "
                     f"like {NAME_EXAMPLES[dataset]}); is data.name right?")
  return ReIDName(identity=int(m.group(1)), camera=int(m.group(2)))


@dataclasses.dataclass(frozen=True)
class ReIDSplit:
  """Image paths with their identities and cameras (aligned arrays)."""
  paths: tuple[str, ...]
  identities: np.ndarray  # int32 (n,)
  cameras: np.ndarray     # int32 (n,)

  def __len__(self) -> int:
    return len(self.paths)

  def subset(self, index) -> "ReIDSplit":
    index = np.asarray(index, np.int64)
    return ReIDSplit(tuple(self.paths[i] for i in index),
                     self.identities[index], self.cameras[index])


def find_root(data_dir: str, dataset: str) -> str:
  """The folder holding the three split folders, or a clear error."""
  data_dir = os.path.expanduser(data_dir)
  for root in (data_dir, *(os.path.join(data_dir, d) for d in DATASET_DIRS[dataset])):
    if all(os.path.isdir(os.path.join(root, f)) for f in FOLDERS.values()):
      return root
  layout = LAYOUT.format(names="|".join(DATASET_DIRS[dataset]),
                         example=NAME_EXAMPLES[dataset])
  raise FileNotFoundError(
      f"No {dataset} dataset under {data_dir!r}. Unpack the archive so that "
      f"data.data_dir has this layout:\n{layout}")


def read_split(root: str, split: str, dataset: str) -> ReIDSplit:
  """Lists one split folder (sorted) with the standard protocol's filtering.

  Args:
    root: the folder from ``find_root``.
    split: ``train`` (drops junk and distractors), ``query`` (drops both) or
      ``gallery`` (drops junk, keeps distractors).
    dataset: ``market1501`` or ``dukemtmc``.
  """
  folder = os.path.join(root, FOLDERS[split])
  rows = []
  for name in sorted(os.listdir(folder)):
    parsed = parse_name(name, dataset)
    if parsed is None or parsed.identity == JUNK:
      continue
    if parsed.identity == DISTRACTOR and split != "gallery":
      continue
    rows.append((os.path.join(folder, name), parsed.identity, parsed.camera))
  if not rows:
    raise FileNotFoundError(f"{folder} holds no {dataset} images (names like "
                            f"{NAME_EXAMPLES[dataset]}).")
  paths, ids, cams = zip(*rows)
  return ReIDSplit(paths, np.asarray(ids, np.int32), np.asarray(cams, np.int32))


def relabel(identities: np.ndarray) -> np.ndarray:
  """Identities -> labels ``0..N-1`` in increasing identity order."""
  return np.unique(identities, return_inverse=True)[1].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ReIDData:
  """A dataset's splits. ``labels`` are the relabelled training identities;
  ``evals`` maps an eval split name to its ``(query, gallery)``."""
  train: ReIDSplit
  labels: np.ndarray
  evals: dict

  @property
  def num_identities(self) -> int:
    return int(self.labels.max()) + 1


def hold_out(train: ReIDSplit, num_identities: int, seed: int = 0):
  """Moves ``num_identities`` training identities into a validation split.

  Each held-out identity gives one query per camera (its first image there);
  its other images form the gallery.

  Returns:
    ``(remaining train, (val query, val gallery))``.
  """
  ids = np.unique(train.identities)
  if not 0 < num_identities < len(ids):
    raise ValueError(f"data.val_identities={num_identities} must be between 1 "
                     f"and {len(ids) - 1} (the training identities minus one).")
  held = np.random.default_rng(seed).choice(ids, num_identities, replace=False)
  is_held = np.isin(train.identities, held)
  query, seen = [], set()
  for i in np.flatnonzero(is_held):
    key = (int(train.identities[i]), int(train.cameras[i]))
    if key not in seen:
      seen.add(key)
      query.append(i)
  gallery = np.setdiff1d(np.flatnonzero(is_held), query)
  return (train.subset(np.flatnonzero(~is_held)),
          (train.subset(query), train.subset(gallery)))


def load(data_cfg) -> ReIDData:
  """Reads the split lists a ``data`` config names (no pixels yet).

  Eval splits: ``test`` (the official query / gallery) and, with
  ``data.val_identities`` > 0, ``val`` held out from the training identities.
  """
  root = find_root(data_cfg.data_dir, data_cfg.name)
  train = read_split(root, "train", data_cfg.name)
  evals = {}
  if data_cfg.get("val_identities", 0):
    train, evals["val"] = hold_out(train, data_cfg.val_identities)
  evals["test"] = (read_split(root, "query", data_cfg.name),
                   read_split(root, "gallery", data_cfg.name))
  return ReIDData(train, relabel(train.identities), evals)


# -- sampling -----------------------------------------------------------------
def epoch_batches(labels: np.ndarray, p: int, k: int) -> int:
  """Batches per epoch: the identities' K-chunks, P to a batch."""
  counts = np.bincount(labels)
  return int(np.sum(np.maximum(counts[counts > 0] // k, 1))) // p


def pk_batches(labels: np.ndarray, p: int, k: int, seed: int, epoch: int
               ) -> np.ndarray:
  """One epoch of identity-balanced batches: P identities x K images each.

  Each identity's images are shuffled and cut into chunks of K (an identity
  with fewer than K images is drawn K times with replacement); every batch
  takes one chunk from each of P distinct identities drawn among those with
  chunks left, refilling the used-up ones when fewer than P remain. An
  epoch has ``epoch_batches`` batches (about one pass over the images).

  Args:
    labels: (n,) training labels ``0..N-1``.
    p: identities per batch.
    k: images per identity.
    seed: run seed.
    epoch: epoch number; (seed, epoch) fix the batches.

  Returns:
    int64 (num_batches, p * k) indices into ``labels``; rows are grouped by
    identity (``k`` consecutive entries each).
  """
  members = [np.flatnonzero(labels == i) for i in range(int(labels.max()) + 1)]
  members = [m for m in members if len(m)]
  if len(members) < p or k < 1:
    raise ValueError(f"The P x K sampler needs P={p} distinct identities and "
                     f"K >= 1; the training set has {len(members)} identities.")
  rng = np.random.default_rng([seed, epoch])

  def chunks(m):
    idx = rng.permutation(m) if len(m) >= k else rng.choice(m, k, replace=True)
    return [idx[j * k:(j + 1) * k] for j in range(len(idx) // k)]

  pools = [chunks(m) for m in members]
  batches = []
  for _ in range(epoch_batches(labels, p, k)):
    alive = [i for i, pool in enumerate(pools) if pool]
    if len(alive) < p:
      for i, pool in enumerate(pools):
        if not pool:
          pool.extend(chunks(members[i]))
      alive = list(range(len(pools)))
    chosen = rng.choice(alive, p, replace=False)
    batches.append(np.concatenate([pools[i].pop() for i in chosen]))
  return np.stack(batches).astype(np.int64)


# -- pixels -------------------------------------------------------------------
def load_image(path: str) -> np.ndarray:
  """uint8 (H, W, 3) RGB (``image_files.read_image``); an unreadable file is
  a ``CorruptImageError`` (a ``ValueError``) naming it."""
  return image_files.read_image(path)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a uint8 image to (height, width)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def random_erasing(image: np.ndarray, rng: np.random.Generator, *,
                   p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                   aspect: float = 0.3, fill: str = "mean") -> np.ndarray:
  """Random erasing (Zhong et al. 2020) of a normalised (H, W, 3) image.

  With probability ``p`` a rectangle of ``area`` fraction of the image and
  aspect ratio in ``[aspect, 1/aspect]`` (up to 100 tries to fit) is filled
  with the ImageNet mean pixel (``fill='mean'``: 0 after normalisation) or
  with uniform random pixels in [0, 1] (``fill='random'``), normalised.
  """
  if fill not in ("mean", "random"):
    raise ValueError(f"random erasing fill {fill!r}: use 'mean' or 'random'.")
  if rng.random() >= p:
    return image
  h, w = image.shape[:2]
  for _ in range(100):
    target = rng.uniform(*area) * h * w
    ratio = rng.uniform(aspect, 1.0 / aspect)
    eh, ew = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if 0 < eh < h and 0 < ew < w:
      top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
      out = image.copy()
      if fill == "mean":
        out[top:top + eh, left:left + ew] = 0.0
      else:
        noise = rng.random((eh, ew, 3), dtype=np.float32)
        out[top:top + eh, left:left + ew] = (
            (noise - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD))
      return out
  return image


def train_image(path: str, rng: np.random.Generator, data_cfg) -> np.ndarray:
  """Decode, resize, flip, pad-and-crop, normalise, erase: float32 (H, W, 3)."""
  h, w = data_cfg.height, data_cfg.width
  x = resize(load_image(path), h, w)
  if data_cfg.flip and rng.random() < 0.5:
    x = x[:, ::-1]
  if data_cfg.pad:
    pad = data_cfg.pad
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    x = x[top:top + h, left:left + w]
  x = normalize(x)
  return random_erasing(x, rng, p=data_cfg.erasing_p, fill=data_cfg.erasing_fill)


def eval_image(path: str, data_cfg) -> np.ndarray:
  """Decode, resize, normalise: float32 (H, W, 3)."""
  return normalize(resize(load_image(path), data_cfg.height, data_cfg.width))


def _pool(data_cfg) -> concurrent.futures.ThreadPoolExecutor:
  # Pillow releases the GIL while decoding and resizing.
  return concurrent.futures.ThreadPoolExecutor(data_cfg.get("num_threads", 8))


def train_batches(paths, labels, data_cfg, *, p: int, k: int, seed: int,
                  epoch: int, process_index: int = 0, process_count: int = 1
                  ) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of this process's rows of the global P x K batches.

  Yields:
    ``{'image': float32 (b, H, W, 3), 'label': int32 (b,)}`` with
    ``b = p * k / process_count``.
  """
  batches = pk_batches(labels, p, k, seed, epoch)
  b = batches.shape[1] // process_count
  with _pool(data_cfg) as pool:
    for step, rows in enumerate(batches):
      rows = rows[process_index * b:(process_index + 1) * b]
      seeds = [(seed, epoch, step, process_index * b + r) for r in range(b)]
      images = pool.map(lambda i_s: train_image(
          paths[i_s[0]], np.random.default_rng(i_s[1]), data_cfg),
                        zip(rows, seeds))
      yield {"image": np.stack(list(images)),
             "label": np.asarray(labels[rows], np.int32)}


def eval_batches(paths, data_cfg, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """All images in order, in global batches of ``batch_size * process_count``
  of which this process yields its rows; the last is padded (``mask`` 0)."""
  global_batch = batch_size * process_count
  with _pool(data_cfg) as pool:
    for start in range(0, len(paths), global_batch):
      lo = start + process_index * batch_size
      chunk = paths[lo:lo + batch_size]
      images = np.zeros((batch_size, data_cfg.height, data_cfg.width, 3), np.float32)
      if chunk:
        images[:len(chunk)] = np.stack(list(pool.map(
            lambda q: eval_image(q, data_cfg), chunk)))
      mask = np.zeros((batch_size,), np.float32)
      mask[:len(chunk)] = 1.0
      yield {"image": images, "mask": mask}
