"""tf.data input pipelines: the data API the trainer calls.

``data_cfg`` (see ``catalog.default_data_config`` and
``catalog.fine_grained_data_config``) names a dataset in ``DATASETS``: the
procedural ``parts`` dataset (builds itself into ``data_dir`` on first use),
the fine-grained TFDS datasets of ``catalog.FINE_GRAINED`` (prepared once with
``tfds build``), or ``folder``, an image folder at ``data_dir``
(``image_folder``). A dataset that is not there raises
``DatasetNotPreparedError`` saying how to get it.

Split names are ours: ``train``, ``validation``, ``test`` (and ``trainval``);
each dataset maps them to its own splits (a TFDS dataset without a
validation split holds out part of its train split, see ``tfds_datasets``).

Training streams are one epoch each, shuffled and augmented
deterministically from (seed, epoch); evaluation streams keep the split's
order and pad the last batch, with a ``mask`` that marks real examples, so
every process runs the same number of equally shaped steps.

Images are decoded after shuffling, so a shuffle buffer holds encoded bytes
(or file names), not pixels (a 10k buffer of decoded 512 px images would take
gigabytes).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from brnpa_jax.data import catalog  # pylint: disable=g-import-not-at-top
from brnpa_jax.data import image_files  # pylint: disable=g-import-not-at-top
from brnpa_jax.data import image_folder  # pylint: disable=g-import-not-at-top
from brnpa_jax.data import parts  # pylint: disable=g-import-not-at-top
from brnpa_jax.data import parts_tfds  # pylint: disable=g-import-not-at-top
from brnpa_jax.data import tfds_datasets  # pylint: disable=g-import-not-at-top
from brnpa_jax.data import transforms  # pylint: disable=g-import-not-at-top
from brnpa_jax.data.catalog import DatasetNotPreparedError  # pylint: disable=g-import-not-at-top,unused-import

# tf.data runs on the host; if TensorFlow saw the accelerator it would reserve
# its memory and starve JAX.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # TF already initialised its devices
  pass
tf.get_logger().setLevel("ERROR")
# Training logs are files; progress bars of a dataset build only clutter them.
tfds.disable_progress_bar()

MASK_KEYS = ("object_mask", "part_mask")
BOX_KEYS = ("bbox",)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to get a dataset and read its examples.

  Attributes:
    make_source: ``data_cfg -> source``, the dataset ready to read: a
      ``tfds_datasets.TfdsSource`` or an ``image_folder.ImageFolder`` (both
      have ``num_classes()``, ``count(split)`` and ``read(split, ...)``).
      Raises ``DatasetNotPreparedError`` when the data is not there.
    num_classes: ``data_cfg -> int`` where the class count is known without
      the data; None asks the source.
  """

  make_source: Callable[[ml_collections.ConfigDict], object]
  num_classes: Callable[[ml_collections.ConfigDict], int] | None = None


def parts_config(data_cfg) -> parts.PartsConfig:
  """The generator parameters in ``data_cfg.parts``, as a ``PartsConfig``."""
  p = data_cfg.parts
  fields = {f.name for f in dataclasses.fields(parts.PartsConfig)}
  sizes = {f"{s}_size" for s in parts_tfds.DEFAULT_SPLIT_SIZES}
  unknown = set(p.keys()) - fields - sizes
  if unknown:
    raise ValueError(f"Unknown data.parts keys {sorted(unknown)}; valid: "
                     f"{sorted(fields | sizes)}.")
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in p.items() if k in fields}
  kwargs["image_size"] = p.image_size or data_cfg.image_size
  return parts.PartsConfig(**kwargs)


def _parts_source(data_cfg):
  sizes = {s: data_cfg.parts[f"{s}_size"] for s in parts_tfds.DEFAULT_SPLIT_SIZES}
  builder = parts_tfds.make_builder(parts_config(data_cfg), sizes,
                                    catalog.data_dir(data_cfg))
  builder.download_and_prepare()  # a no-op once the files are there
  return tfds_datasets.TfdsSource(
      builder, {"image": "image", "label": "label", "object_mask": "object_mask",
                "part_mask": "part_mask", "id": "id"},
      splits={"trainval": "train+validation"})


def _tfds_source(name: str):
  dataset = catalog.FINE_GRAINED[name]

  def make(data_cfg):
    data_dir = catalog.data_dir(data_cfg)
    builder = tfds.builder(name, data_dir=data_dir)
    tfds_datasets.check_prepared(builder, dataset.how_to_get(data_dir))
    return tfds_datasets.TfdsSource(builder, dataset.keys, dataset.splits,
                                    tfds_datasets.FINISH.get(name))
  return make


def _folder_source(data_cfg):
  f = data_cfg.get("folder") or ml_collections.ConfigDict()
  return image_folder.load(
      catalog.data_dir(data_cfg),
      validation_percent=f.get("validation_percent", catalog.VALIDATION_PERCENT),
      seed=f.get("seed", 0), verify=f.get("verify", True),
      on_corrupt=f.get("on_corrupt", "error"),
      max_pixels=f.get("max_pixels", image_files.MAX_PIXELS))


DATASETS: dict[str, DatasetSpec] = {
    "parts": DatasetSpec(_parts_source,
                         num_classes=lambda data_cfg: data_cfg.parts.num_classes),
    **{name: DatasetSpec(_tfds_source(name)) for name in catalog.FINE_GRAINED},
    "folder": DatasetSpec(_folder_source),
}


def _spec(data_cfg) -> DatasetSpec:
  if data_cfg.name not in DATASETS:
    raise ValueError(f"Unknown dataset {data_cfg.name!r}; known datasets: "
                     f"{sorted(DATASETS)}.")
  return DATASETS[data_cfg.name]


def get_source(data_cfg):
  """The dataset ready to read (``TfdsSource`` or ``ImageFolder``).

  Builds the procedural ``parts`` dataset on first use; scans an image folder
  (once per process).

  Raises:
    ValueError: for a dataset name not in ``DATASETS``.
    DatasetNotPreparedError: the data is missing; the message says how to
      get it.
  """
  return _spec(data_cfg).make_source(data_cfg)


def get_builder(data_cfg):
  """Prepares the dataset and returns its TFDS builder (``ImageFolder`` for
  image folders); the trainer calls it on process 0 before the others."""
  source = get_source(data_cfg)
  return getattr(source, "builder", source)


def num_classes(data_cfg) -> int:
  """Number of classes of the dataset (parts: without building it)."""
  spec = _spec(data_cfg)
  if spec.num_classes is not None:
    return spec.num_classes(data_cfg)
  return get_source(data_cfg).num_classes()


def class_names(data_cfg) -> list[str]:
  """The class names in label order (parts: its glyph pairs, without
  building it; image folders: the folder names; TFDS: its label names)."""
  if data_cfg.name == "parts":
    return ["+".join(t) for t in parts.class_part_types(parts_config(data_cfg))]
  return get_source(data_cfg).class_names()


def num_examples(data_cfg, split: str) -> int:
  """Number of examples in ``split``: our split name, or for TFDS datasets
  any TFDS split string (``train[:10%]``)."""
  return get_source(data_cfg).count(split)


def _epoch_seeds(seed: int, epoch: int) -> list[int]:
  # SeedSequence mixes (seed, epoch) so nearby pairs give unrelated streams.
  return [int(s) for s in np.random.SeedSequence([seed, epoch]).generate_state(3)]


def make_train_dataset(data_cfg, *, batch_size: int, seed: int, epoch: int,
                       process_index: int = 0, process_count: int = 1
                       ) -> tf.data.Dataset:
  """One training epoch of this process's shard, augmented and batched.

  Args:
    data_cfg: the ``data`` ConfigDict.
    batch_size: per-process batch size.
    seed: run seed; with ``epoch`` it fixes the order and the augmentation.
    epoch: epoch number (a new order and new augmentation each epoch).
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).

  Returns:
    A dataset of ``{'image': float32 (B, S, S, 3), 'label': int32 (B,)}``;
    every process gets the same number of full batches (the trainer takes
    ``num_examples // global_batch`` of them).

  ``data_cfg.process_split`` chooses how processes divide the data:
  ``'shard'`` (default) gives each process its own part of the split
  (``tfds.split_for_jax_process``), reading only that; ``'slice'`` has every
  process walk the same shuffled stream and keep its rows of each global
  batch, so the global batches, and hence the run, are the same for any
  number of processes (each process reads, but does not decode, all of it).
  """
  source = get_source(data_cfg)
  mode = data_cfg.get("process_split", "shard")
  if mode not in catalog.PROCESS_SPLITS:
    raise ValueError(f"data.process_split={mode!r}: use one of "
                     f"{catalog.PROCESS_SPLITS}.")
  slicing = mode == "slice" and process_count > 1
  file_seed, shuffle_seed, aug_seed = _epoch_seeds(seed, epoch)
  ds, decode = source.read(
      data_cfg.train_split, keep=("image", "label"), shuffle_seed=file_seed,
      process_index=process_index, process_count=process_count,
      drop_remainder=True, whole=slicing)
  ds = ds.shuffle(data_cfg.shuffle_buffer, seed=shuffle_seed,
                  reshuffle_each_iteration=False)
  size = data_cfg.image_size

  def preprocess(index, ex):
    ex = decode(ex)
    example_seed = tf.stack([tf.constant(aug_seed, tf.int64), index])
    image, _ = transforms.train_transform(
        ex["image"], {}, example_seed, size=size,
        resize_ratio=data_cfg.resize_ratio, flip=data_cfg.flip,
        resize_mode=data_cfg.get("resize", "short_side"),
        brightness=data_cfg.brightness, saturation=data_cfg.saturation)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.enumerate()  # the position in the epoch also seeds augmentation
  if slicing:
    global_batch = batch_size * process_count
    ds = ds.filter(lambda i, ex: (i % global_batch) // batch_size == process_index)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(data_cfg, split: str, *, batch_size: int,
                      process_index: int = 0, process_count: int = 1
                      ) -> tf.data.Dataset:
  """This process's shard of ``split`` in order, the last batch padded.

  Args:
    data_cfg: the ``data`` ConfigDict.
    split: our split name (``validation``, ``test``, ...) or, for TFDS
      datasets, a TFDS split string.
    batch_size: per-process batch size.
    process_index: this process.
    process_count: number of processes.

  Returns:
    A dataset of dicts: ``image`` float32 (B, S, S, 3), ``label`` int32 (B,),
    ``mask`` float32 (B,) (1 real, 0 padding), ``id`` int32 (B,) (-1 for
    padding) and, when the dataset has them, ``object_mask`` and
    ``part_mask`` float32 (B, S, S) in {0, 1} and ``bbox`` float32 (B, 4),
    ``[ymin, xmin, ymax, xmax]`` normalised to the S x S crop (zeros for
    padding). Every process yields
    ``ceil(ceil(n / process_count) / batch_size)`` batches.
  """
  source = get_source(data_cfg)
  total = source.count(split)
  ds, decode = source.read(split, keep=("image", "label", "id") + MASK_KEYS
                           + BOX_KEYS, process_index=process_index,
                           process_count=process_count)
  size = data_cfg.image_size
  resize_mode = data_cfg.get("resize", "short_side")
  # even_splits gives the first (total % count) processes one extra example.
  offset = (process_index * (total // process_count)
            + min(process_index, total % process_count))

  def preprocess(index, ex):
    ex = decode(ex)
    mask_keys = [k for k in MASK_KEYS if k in ex]
    boxes = {k: transforms.eval_box(ex[k], tf.shape(ex["image"])[:2], size=size,
                                    resize_ratio=data_cfg.resize_ratio,
                                    resize_mode=resize_mode)
             for k in BOX_KEYS if k in ex}
    image, masks = transforms.eval_transform(
        ex["image"], {k: ex[k] for k in mask_keys}, size=size,
        resize_ratio=data_cfg.resize_ratio, resize_mode=resize_mode)
    ex_id = ex["id"] if "id" in ex else index + offset
    return {"image": image, "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(1.0), "id": tf.cast(ex_id, tf.int32),
            **transforms.binarize(masks), **boxes}

  ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  local = int(ds.cardinality())
  if local < 0:
    local = int(ds.reduce(0, lambda c, _: c + 1))
  # max() only matters for mocked datasets, which ignore the sub-split.
  per_process = max(math.ceil(total / process_count), local)
  num_batches = math.ceil(per_process / batch_size)
  padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                  ds.element_spec)
  padding["id"] = tf.constant(-1, tf.int32)
  pad = tf.data.Dataset.from_tensors(padding).repeat(
      num_batches * batch_size - local)
  ds = ds.concatenate(pad).batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)
