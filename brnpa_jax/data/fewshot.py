"""Few-shot data: class splits, in-memory image sets, episodes and batches.

Few-shot learning splits a dataset by *class*: the network trains on the
base classes; validation (model selection) and test episodes are drawn from
disjoint val and novel classes. Each split is decoded once into memory as
uint8 images of side ``stored_size`` (short side resized, centre-cropped:
the crop margin of training augmentation), so episodes can pick any images
of any class. Batches are built in numpy and handed to tf.data by
``as_tf_dataset``.

Datasets (``data.name``) and their class splits, defined here:

- ``caltech_birds2011`` (tfds, CUB-200-2011): all 11,788 images (tfds train
  and test), 200 classes in the dataset's class order (``001.Black_footed_
  Albatross`` = 0). The split of Chen et al. 2019, "A Closer Look at Few-shot
  Classification" (``write_CUB_filelist.py``): base = index % 2 == 0 (100
  classes), val = index % 4 == 1 (50), novel = index % 4 == 3 (50).
- ``omniglot`` (tfds): the background set (tfds ``train``, characters
  0..963) is base; the evaluation set (tfds ``test``, characters 964..1622,
  ordered by alphabet then character) is cut in two contiguous halves, so
  val and novel share at most one alphabet: val = 964..1292 (329
  characters), novel = 1293..1622 (330). Grayscale strokes are replicated to
  3 channels; ``image_size`` 28 or 84.
- ``folder``: ``data.folder.root`` holding one folder per split
  (``train``/``val``/``test`` by default, ``data.folder.splits``), each with
  one folder per class: the mini-ImageNet (Ravi & Larochelle), tieredImageNet
  and CIFAR-FS layouts once their split files are applied. Classes are sorted
  by folder name. Files are listed, checked and decoded by
  ``brnpa_jax.data.image_files``, as the classification reader does: RGB, an
  unreadable file is an error naming its path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Iterator

import numpy as np

from brnpa_jax import quiet
from brnpa_jax.data import image_files
from brnpa_jax.data.normalization import normalize, resize_size
from brnpa_jax.errors import BadInputError, InputNotFoundError

SPLITS = ("base", "val", "novel")
OMNIGLOT_BACKGROUND = 964
OMNIGLOT_CLASSES = 1623
OMNIGLOT_VAL_END = 1293


def cub_class_splits(num_classes: int = 200) -> dict[str, np.ndarray]:
  """CUB-200-2011 classes of each split (Chen et al. 2019): 100/50/50."""
  index = np.arange(num_classes)
  return {"base": index[index % 2 == 0], "val": index[index % 4 == 1],
          "novel": index[index % 4 == 3]}


def omniglot_class_splits() -> dict[str, np.ndarray]:
  """Omniglot characters of each split: 964 background / 329 / 330."""
  return {"base": np.arange(OMNIGLOT_BACKGROUND),
          "val": np.arange(OMNIGLOT_BACKGROUND, OMNIGLOT_VAL_END),
          "novel": np.arange(OMNIGLOT_VAL_END, OMNIGLOT_CLASSES)}


@dataclasses.dataclass(frozen=True)
class TfdsFewShot:
  """A tfds dataset split by class: which tfds splits hold which classes."""
  name: str
  tfds_splits: dict[str, str]   # our split -> tfds split string to read
  class_splits: Callable[[], dict[str, np.ndarray]]


TFDS_DATASETS = {
    "caltech_birds2011": TfdsFewShot(
        "caltech_birds2011", {s: "train+test" for s in SPLITS}, cub_class_splits),
    "omniglot": TfdsFewShot(
        "omniglot", {"base": "train", "val": "test", "novel": "test"},
        omniglot_class_splits),
}


@dataclasses.dataclass
class ImageSet:
  """One split in memory.

  Attributes:
    images: uint8 (n, S, S, 3), S = ``stored_size``.
    labels: int32 (n,), the split's own class indices 0..num_classes-1.
    class_ids: (num_classes,) the dataset's class ids (or folder names).
  """
  images: np.ndarray
  labels: np.ndarray
  class_ids: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_ids)

  def __len__(self) -> int:
    return len(self.labels)


def stored_size(data_cfg) -> int:
  """Side of the images kept in memory: the crop plus its resize margin."""
  return resize_size(data_cfg.image_size, data_cfg.resize_ratio)


def _square_tf(image, side: int):
  """uint8 (H, W, C) tensor -> uint8 (side, side, 3): short side, centre crop."""
  tf = quiet.tensorflow()
  from brnpa_jax.data import transforms  # pylint: disable=g-import-not-at-top
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  image = tf.image.convert_image_dtype(image, tf.float32)
  image, _ = transforms.resize_short_side(image, {}, side)
  image, _ = transforms.center_crop(image, {}, side)
  return tf.image.convert_image_dtype(image, tf.uint8, saturate=True)


def load_tfds_split(data_cfg, split: str) -> ImageSet:
  """Reads one class split of a tfds dataset into memory.

  Raises:
    ValueError: unknown dataset or split, or no image of the split's classes.
  """
  tf = quiet.tensorflow()
  spec = TFDS_DATASETS[data_cfg.name]
  class_ids = spec.class_splits()[split]
  side = stored_size(data_cfg)
  ds = _tfds_builder(data_cfg).as_dataset(split=spec.tfds_splits[split],
                                          shuffle_files=False)
  lookup = np.full(int(max(class_ids)) + 1, -1, np.int32)
  lookup[class_ids] = np.arange(len(class_ids), dtype=np.int32)
  table = tf.constant(lookup)
  ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
  ds = ds.filter(lambda image, label: (label < len(lookup))
                 & (tf.gather(table, tf.minimum(label, len(lookup) - 1)) >= 0))
  ds = ds.map(lambda image, label: (_square_tf(image, side),
                                    tf.gather(table, label)),
              num_parallel_calls=tf.data.AUTOTUNE)
  images, labels = _collect(ds)
  if not len(labels):
    raise ValueError(f"No {spec.name} image of the {split!r} classes in tfds "
                     f"split {spec.tfds_splits[split]!r}.")
  return ImageSet(images, labels, class_ids)


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) numpy arrays of a dataset of (image, label) pairs."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images, labels = [], []
  for image_b, label_b in tfds.as_numpy(ds.batch(512)):
    images.append(image_b)
    labels.append(label_b)
  if not images:
    return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(images), np.concatenate(labels)


def load_folder_split(data_cfg, split: str) -> ImageSet:
  """Reads ``<root>/<split folder>/<class>/<image>`` into memory.

  Listing, the image extensions, hidden-file rules, corrupt-file checks
  (every file decoded once, in threads) and decoding are those of
  ``brnpa_jax.data.image_files``, as for the classification reader.

  Raises:
    InputNotFoundError: missing root or split folder.
    BadInputError: a split folder without class folders, a class folder
      without images; ``image_files.CorruptImageError`` naming unreadable
      files.
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  tf = quiet.tensorflow()
  root = os.path.expanduser(data_cfg.folder.root)
  folder = dict(zip(SPLITS, data_cfg.folder.splits))[split]
  path = os.path.join(root, folder)
  if not os.path.isdir(path):
    raise InputNotFoundError(
        f"No {split} folder {path}: data.folder.root must hold the folders "
        f"{tuple(data_cfg.folder.splits)} (base, val, novel classes), each with "
        "one folder of images per class.")
  classes = image_files.list_folders(path)
  if not classes:
    raise BadInputError(f"{path} has no class folders.")
  files, labels = [], []
  for label, name in enumerate(classes):
    class_folder = os.path.join(path, name)
    found = [os.path.join(class_folder, f)
             for f in image_files.list_images(class_folder)]
    if not found:
      raise BadInputError(
          f"Class folder {image_files.message_name(class_folder)} has no images "
          f"({', '.join(image_files.IMAGE_EXTENSIONS)}): add some or delete it.")
    files += found
    labels += [label] * len(found)

  max_pixels = data_cfg.folder.get("max_pixels", image_files.MAX_PIXELS)

  def inspect(f):
    try:
      return image_files.inspect_image(f, verify=True,
                                       max_pixels=max_pixels), None
    except image_files.CorruptImageError as e:
      return None, str(e)
  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
    kinds, errors = zip(*ex.map(inspect, files))
  errors = [e for e in errors if e]
  if errors:
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    raise image_files.CorruptImageError(
        f"{len(errors)} unreadable image(s): " + " | ".join(errors[:3])
        + f"{more}. Remove or replace them.")
  side = stored_size(data_cfg)
  ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(f) for f in files],
                                          list(kinds), labels))
  decode = functools.partial(image_files.decode_file, max_pixels=max_pixels)
  ds = ds.map(lambda f, k, l: (_square_tf(decode(f, k), side),
                               tf.cast(l, tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE)
  images, labels = _collect(ds)
  return ImageSet(images, labels, np.asarray(classes))


def _tfds_builder(data_cfg):
  """The dataset's tfds builder in ``data.data_dir``, prepared (Omniglot
  downloads itself on first use; a no-op once prepared)."""
  quiet.tensorflow()  # before tfds loads it
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = TFDS_DATASETS[data_cfg.name].name
  data_dir = os.path.expanduser(data_cfg.data_dir)
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"{name} is not prepared in {data_dir} and could not be prepared "
        f"({type(e).__name__}: {e}). Prepare it once with `tfds build {name} "
        f"--data_dir {data_dir}` on a machine with network access (or copy a "
        "prepared directory there), or set data.data_dir.") from e
  return builder


def prepare(data_cfg) -> None:
  """Makes ``data.name`` ready: prepares a tfds dataset, checks a folder root."""
  if data_cfg.name == "folder":
    root = os.path.expanduser(data_cfg.folder.root or "")
    if not os.path.isdir(root):
      raise FileNotFoundError(f"data.folder.root={root!r} is not a directory; "
                              "pass root=<dataset folder> in the config arg.")
  elif data_cfg.name in TFDS_DATASETS:
    _tfds_builder(data_cfg)
  else:
    raise ValueError(f"Unknown few-shot dataset {data_cfg.name!r}; valid: "
                     f"{sorted(TFDS_DATASETS) + ['folder']}.")


def load_split(data_cfg, split: str) -> ImageSet:
  """One class split (``base``, ``val`` or ``novel``) of ``data.name``."""
  if split not in SPLITS:
    raise ValueError(f"Unknown few-shot split {split!r}; valid: {SPLITS}.")
  if data_cfg.name == "folder":
    return load_folder_split(data_cfg, split)
  if data_cfg.name not in TFDS_DATASETS:
    prepare(data_cfg)  # raises: unknown dataset
  return load_tfds_split(data_cfg, split)


# -- episodes -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Episodes:
  """A stack of N-way K-shot episodes (indices into an ``ImageSet``).

  Attributes:
    support: int (E, N, K) image indices, class-major.
    query: int (E, N, Q) image indices, disjoint from the support.
    classes: int (E, N) the split's class of each episode label 0..N-1.
  """
  support: np.ndarray
  query: np.ndarray
  classes: np.ndarray


class EpisodeSampler:
  """Draws N-way K-shot Q-query episodes; episode ``i`` depends only on
  ``(seed, i)``, so any range of episodes can be drawn in any order, by any
  process, and gives the same episodes.

  Args:
    labels: (n,) class index of each image.
    ways: N, classes per episode.
    shots: K, support images per class.
    queries: Q, query images per class.
    seed: the sampler's seed.

  Raises:
    ValueError: fewer than N classes with at least K + Q images each.
  """

  def __init__(self, labels, ways: int, shots: int, queries: int, seed: int):
    labels = np.asarray(labels)
    self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
    if min(ways, shots) < 1 or queries < 0:
      raise ValueError(f"Episodes need ways >= 1, shots >= 1, queries >= 0; "
                       f"got {ways}, {shots}, {queries}.")
    classes = np.unique(labels)
    self._members = [np.flatnonzero(labels == c) for c in classes]
    small = [int(c) for c, m in zip(classes, self._members)
             if len(m) < shots + queries]
    if small:
      raise ValueError(f"{len(small)} classes (e.g. {small[:5]}) have fewer than "
                       f"shots + queries = {shots + queries} images; lower "
                       "shots or queries.")
    if len(classes) < ways:
      raise ValueError(f"{ways}-way episodes need {ways} classes; the split has "
                       f"{len(classes)}.")
    self._classes = classes

  def episode(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(support (N, K), query (N, Q), classes (N,))`` of episode ``index``."""
    rng = np.random.default_rng([self.seed, index])
    picked = rng.choice(len(self._classes), self.ways, replace=False)
    draws = np.stack([rng.choice(self._members[c], self.shots + self.queries,
                                 replace=False) for c in picked])
    return draws[:, :self.shots], draws[:, self.shots:], self._classes[picked]

  def episodes(self, start: int, count: int) -> Episodes:
    """Episodes ``start .. start + count - 1``, stacked."""
    support, query, classes = zip(*(self.episode(i)
                                    for i in range(start, start + count)))
    return Episodes(np.stack(support), np.stack(query), np.stack(classes))


def episode_layout(ways: int, shots: int, queries: int) -> np.ndarray:
  """Episode labels of one training episode's rows: support (class-major,
  N*K rows) then query (N*Q rows)."""
  return np.concatenate([np.repeat(np.arange(ways), shots),
                         np.repeat(np.arange(ways), queries)]).astype(np.int32)


# -- batches --------------------------------------------------------------------


def augment(images_BxSxSx3: np.ndarray, rng: np.random.Generator, *, size: int,
            flip: bool) -> np.ndarray:
  """Random ``size`` crop and optional horizontal flip, then normalisation."""
  b, side = images_BxSxSx3.shape[0], images_BxSxSx3.shape[1]
  tops = rng.integers(0, side - size + 1, b)
  lefts = rng.integers(0, side - size + 1, b)
  flips = rng.random(b) < 0.5 if flip else np.zeros(b, bool)
  out = np.empty((b, size, size, 3), np.uint8)
  for i in range(b):
    crop = images_BxSxSx3[i, tops[i]:tops[i] + size, lefts[i]:lefts[i] + size]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return normalize(out)


def center(images_BxSxSx3: np.ndarray, size: int) -> np.ndarray:
  """The central ``size`` crop, normalised (evaluation)."""
  off = (images_BxSxSx3.shape[1] - size) // 2
  return normalize(images_BxSxSx3[:, off:off + size, off:off + size])


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(list(key))


def classification_batches(data: ImageSet, *, batch_size: int, seed: int,
                           epoch: int, size: int, flip: bool,
                           process_index: int = 0, process_count: int = 1
                           ) -> Iterator[dict[str, np.ndarray]]:
  """One shuffled epoch of ``{'image', 'label'}`` batches of this process.

  The epoch order and augmentation depend on ``(seed, epoch)`` only; each
  global batch is cut into per-process rows, so the run is the same for any
  process count. Yields ``len(data) // (batch_size * process_count)`` batches.
  """
  global_batch = batch_size * process_count
  order = _rng(seed, epoch).permutation(len(data))
  rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
  for step in range(len(data) // global_batch):
    index = order[step * global_batch:(step + 1) * global_batch]
    images = augment(data.images[index], _rng(seed, epoch, step), size=size,
                     flip=flip)
    yield {"image": images[rows], "label": data.labels[index][rows]}


def episode_batches(data: ImageSet, sampler: EpisodeSampler, *,
                    episodes_per_batch: int, num_batches: int, first_episode: int,
                    seed: int, size: int, flip: bool, process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Training batches of whole episodes (``episode_layout`` rows each).

  ``episodes_per_batch`` is per process; global batch ``b`` holds episodes
  ``first_episode + b * E * P ...``, process ``p`` the ``p``-th run of E.
  Yields ``{'image', 'label' (episode labels), 'episode_class' (the split's
  class of each row)}``.
  """
  layout = episode_layout(sampler.ways, sampler.shots, sampler.queries)
  global_eps = episodes_per_batch * process_count
  for b in range(num_batches):
    start = first_episode + b * global_eps + process_index * episodes_per_batch
    eps = sampler.episodes(start, episodes_per_batch)
    n = eps.support.shape[0]
    index = np.concatenate([eps.support.reshape(n, -1),
                            eps.query.reshape(n, -1)], axis=1).reshape(-1)
    images = augment(data.images[index], _rng(seed, start), size=size, flip=flip)
    yield {"image": images, "label": np.tile(layout, n),
           "episode_class": data.labels[index]}
