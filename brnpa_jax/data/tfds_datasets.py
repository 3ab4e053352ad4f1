"""Reading TFDS builders with our key and split names.

``TfdsSource`` wraps a prepared TFDS builder so that the input pipeline reads
it with our key names (``image``, ``label``, ``object_mask``, ``bbox``, ...)
and our split names (``train``, ``validation``, ``test``, ``trainval``; see
``catalog``). Any other split string (for example ``test[:100]``) is passed
to TFDS unchanged. ``FINISH`` turns each fine-grained dataset's annotations
into ours (``catalog.FINE_GRAINED`` says which it has): masks (H, W, 1)
uint8, nonzero on the object; boxes ``[ymin, xmin, ymax, xmax]`` normalised
to the image.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import tensorflow_datasets as tfds

from brnpa_jax import quiet
from brnpa_jax.data import catalog

tf = quiet.tensorflow()

# Raised here and by image folders; defined TensorFlow-free in the catalog.
DatasetNotPreparedError = catalog.DatasetNotPreparedError


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


# catalog.FINE_GRAINED name -> per decoded example (our keys) -> example.
FINISH: dict[str, Callable[[dict], dict]] = {
    "caltech_birds2011": _cub_finish,
    "stanford_dogs": _dogs_finish,
    "oxford_iiit_pet": _pet_finish,
}


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

  def class_names(self) -> list[str]:
    return list(self.builder.info.features[self.keys["label"]].names)

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
