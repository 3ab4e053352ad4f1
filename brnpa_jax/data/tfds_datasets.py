"""Reading TFDS builders, and the fine-grained datasets of the paper.

``TfdsSource`` wraps a prepared TFDS builder so that the input pipeline reads
it with our key names (``image``, ``label``, ``object_mask``, ``bbox``, ...)
and our split names (``train``, ``validation``, ``test``, ``trainval``).

Datasets that TFDS ships without a validation split get one carved from the
TFDS ``train`` split: its last ``VALIDATION_PERCENT`` percent
(``train[90%:]``), training on the rest (``train[:90%]``). TFDS writes the
examples of a split in an order fixed by hashing their keys, so this is a
deterministic, class-mixed subset, the same on every machine; ``trainval``
names the whole TFDS ``train`` split (plus ``validation`` where TFDS has one)
for a final run without model selection. Any other split string (for example
``test[:100]``) is passed to TFDS unchanged.

Annotations kept for evaluation, per dataset (TFDS feature -> our key):

- ``caltech_birds2011``: ``segmentation_mask`` -> ``object_mask`` (the masks
  are soft, 0-255 by annotator agreement; a pixel is on the bird from 128),
  ``bbox`` -> ``bbox``.
- ``cars196``: ``bbox`` -> ``bbox``.
- ``stanford_dogs``: ``objects/bbox`` (one box per dog) -> ``bbox``, the
  smallest box enclosing all of them.
- ``oxford_iiit_pet``: the ``segmentation_mask`` trimap (1 pet, 2 background,
  3 outline) -> ``object_mask`` (pet and outline).
- ``oxford_flowers102``: labels only.

Boxes are ``[ymin, xmin, ymax, xmax]`` normalised to the image, as TFDS gives
them; masks are (H, W, 1) uint8, nonzero on the object.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

VALIDATION_PERCENT = 10

CARVED_SPLITS = {
    "train": f"train[:{100 - VALIDATION_PERCENT}%]",
    "validation": f"train[{100 - VALIDATION_PERCENT}%:]",
    "test": "test",
    "trainval": "train",
}
NATIVE_SPLITS = {"train": "train", "validation": "validation", "test": "test",
                 "trainval": "train+validation"}


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset's files are missing; the message says how to get them."""


def _mask_like_image(mask, image):
  """Resizes ``mask`` to the image's size when they differ (nearest)."""
  same = tf.reduce_all(tf.equal(tf.shape(mask)[:2], tf.shape(image)[:2]))
  return tf.cond(same, lambda: mask,
                 lambda: tf.image.resize(mask, tf.shape(image)[:2], "nearest"))


def _cub_finish(ex):
  if "object_mask" not in ex:  # training reads images and labels only
    return ex
  seg = _mask_like_image(ex["object_mask"], ex["image"])
  return dict(ex, object_mask=tf.cast(seg >= 128, tf.uint8))


def _pet_finish(ex):
  if "object_mask" not in ex:
    return ex
  trimap = _mask_like_image(ex["object_mask"], ex["image"])
  return dict(ex, object_mask=tf.cast((trimap == 1) | (trimap == 3), tf.uint8))


def _dogs_finish(ex):
  if "bbox" not in ex:
    return ex
  boxes_Nx4 = tf.reshape(tf.cast(ex["bbox"]["bbox"], tf.float32), (-1, 4))
  empty = tf.equal(tf.shape(boxes_Nx4)[0], 0)
  enclosing = tf.concat([tf.reduce_min(boxes_Nx4[:, :2], 0),
                         tf.reduce_max(boxes_Nx4[:, 2:], 0)], 0)
  return dict(ex, bbox=tf.where(empty, tf.zeros(4), enclosing))


class FineGrainedDataset:
  """A TFDS fine-grained dataset: features to keep and how to prepare it.

  Attributes:
    name: the TFDS builder name.
    keys: our key -> TFDS feature name.
    splits: our split name -> TFDS split string.
    finish: per decoded example (our keys) -> example, e.g. mask thresholds.
    files: the archives TFDS downloads (what to place in the manual folder
      when a download URL fails).
    needs: Python packages the TFDS build step imports.
  """

  def __init__(self, name: str, keys: Mapping[str, str], splits: Mapping[str, str],
               finish: Callable[[dict], dict] | None, files: Sequence[str],
               needs: Sequence[str] = ()):
    self.name, self.keys, self.splits, self.finish = name, keys, splits, finish
    self.files, self.needs = tuple(files), tuple(needs)

  def how_to_get(self, data_dir: str) -> str:
    """The commands that prepare the dataset in ``data_dir``."""
    needs = (f"pip install {' '.join(self.needs)}\n  " if self.needs else "")
    return (
        f"Dataset {self.name!r} is not prepared in {data_dir}. Prepare it once "
        f"(downloads the archives, then writes TFRecords):\n  {needs}"
        f"tfds build {self.name} --data_dir={data_dir}\n"
        f"If a download fails (some original URLs have moved), download "
        f"{', '.join(self.files)} by hand into "
        f"{os.path.join(data_dir, 'downloads', 'manual')}/ and run the same "
        f"command again; or set data.data_dir to where the dataset is "
        f"already prepared.")


_IMAGE_LABEL = {"image": "image", "label": "label"}

FINE_GRAINED = {d.name: d for d in (
    FineGrainedDataset(
        "caltech_birds2011",
        {**_IMAGE_LABEL, "object_mask": "segmentation_mask", "bbox": "bbox"},
        CARVED_SPLITS, _cub_finish, ("CUB_200_2011.tgz", "segmentations.tgz"),
        ("opencv-python-headless",)),
    FineGrainedDataset(
        "cars196", {**_IMAGE_LABEL, "bbox": "bbox"}, CARVED_SPLITS, None,
        ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz",
         "cars_test_annos_withlabels.mat"), ("scipy",)),
    FineGrainedDataset(
        "stanford_dogs", {**_IMAGE_LABEL, "bbox": "objects"}, CARVED_SPLITS,
        _dogs_finish, ("images.tar", "lists.tar", "annotation.tar"), ("scipy",)),
    FineGrainedDataset(
        "oxford_flowers102", dict(_IMAGE_LABEL), NATIVE_SPLITS, None,
        ("102flowers.tgz", "imagelabels.mat", "setid.mat"), ("scipy",)),
    FineGrainedDataset(
        "oxford_iiit_pet", {**_IMAGE_LABEL, "object_mask": "segmentation_mask"},
        CARVED_SPLITS, _pet_finish, ("images.tar.gz", "annotations.tar.gz")),
)}


def check_prepared(builder, how_to_get: str, probe_split: str = "train") -> None:
  """Raises ``DatasetNotPreparedError(how_to_get)`` if ``builder`` has no data.

  A builder under ``tfds.testing.mock_data`` has no files but serves
  examples; asking it for a dataset tells the two cases apart.
  """
  if builder.is_prepared():
    return
  try:
    builder.as_dataset(split=probe_split)
  except AssertionError as e:  # TFDS: "could not find data in ..."
    raise DatasetNotPreparedError(how_to_get) from e


class TfdsSource:
  """A prepared TFDS builder read with our key and split names.

  Args:
    builder: the TFDS builder.
    keys: our key -> feature name (features absent from the builder are
      skipped).
    splits: our split name -> TFDS split string; other names pass unchanged.
    finish: optional function applied to each decoded example.
  """

  def __init__(self, builder, keys: Mapping[str, str],
               splits: Mapping[str, str] | None = None,
               finish: Callable[[dict], dict] | None = None):
    self.builder, self.keys = builder, dict(keys)
    self.splits, self.finish = dict(splits or {}), finish

  def resolve(self, split: str) -> str:
    """The TFDS split string of our split name."""
    return self.splits.get(split, split)

  def num_classes(self) -> int:
    return self.builder.info.features[self.keys["label"]].num_classes

  def count(self, split: str) -> int:
    """Examples in ``split``: from the metadata, else by counting."""
    split = self.resolve(split)
    try:
      n = self.builder.info.splits[split].num_examples
    except (KeyError, ValueError):  # unknown to the metadata (mocked datasets)
      n = 0
    if not n:
      ds = self.builder.as_dataset(split=split)
      n = int(ds.cardinality())
      if n < 0:
        n = int(ds.reduce(0, lambda c, _: c + 1))
    return n

  def read(self, split: str, *, keep: Sequence[str], shuffle_seed=None,
           process_index: int = 0, process_count: int = 1,
           drop_remainder: bool = False, whole: bool = False):
    """Reads this process's part of ``split``, images still encoded.

    Args:
      split: our split name or a TFDS split string.
      keep: our keys to keep (those the dataset lacks are skipped).
      shuffle_seed: shuffles the file order with this seed; None keeps it.
      process_index: this process.
      process_count: number of processes.
      drop_remainder: every process gets ``n // process_count`` examples.
      whole: read all of ``split`` (every process the same).

    Returns:
      ``(dataset of {key: encoded value}, decode)``; ``decode`` turns one
      example into decoded tensors (images uint8 (H, W, C)).
    """
    split = self.resolve(split)
    if not whole:
      split = tfds.split_for_jax_process(
          split, process_index=process_index, process_count=process_count,
          drop_remainder=drop_remainder)
    features = self.builder.info.features
    wanted = {k: self.keys[k] for k in keep
              if k in self.keys and self.keys[k] in features}
    images = {k for k, f in wanted.items()
              if isinstance(features[f], tfds.features.Image)}
    skip = {wanted[k]: tfds.decode.SkipDecoding() for k in images}
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    ds = self.builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                                 decoders=skip, read_config=read_config)
    ds = ds.map(lambda ex: {k: ex[f] for k, f in wanted.items()})

    def decode(ex):
      out = dict(ex)
      for k in images:
        out[k] = features[wanted[k]].decode_example(ex[k])
      return self.finish(out) if self.finish else out
    return ds, decode
