"""The datasets the project reads and the ``data`` section of a config.

Free of TensorFlow: configs build their ``data`` section here, so loading a
config (or the package) imports no TensorFlow; ``input_pipeline`` reads the
datasets these names describe.

- ``parts``: the procedural dataset embedded in the package (``parts``),
  built into the data directory on first use.
- The fine-grained TFDS datasets of the paper (``FINE_GRAINED``), prepared
  once with ``tfds build``. Datasets that TFDS ships without a validation
  split get one carved from its ``train`` split: the last
  ``VALIDATION_PERCENT`` percent (``train[90%:]``), training on the rest;
  ``trainval`` names the whole TFDS ``train`` split (plus ``validation``
  where TFDS has one).
- ``folder``: one sub-folder per class (``image_folder``).

The data directory defaults to ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets`` (TFDS's own rule); ``data.data_dir`` overrides it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

import ml_collections

from brnpa_jax.data import parts
from brnpa_jax.data.image_files import MAX_PIXELS
from brnpa_jax.errors import ConfigError, UserError

VALIDATION_PERCENT = 10

CARVED_SPLITS = {
    "train": f"train[:{100 - VALIDATION_PERCENT}%]",
    "validation": f"train[{100 - VALIDATION_PERCENT}%:]",
    "test": "test",
    "trainval": "train",
}
NATIVE_SPLITS = {"train": "train", "validation": "validation", "test": "test",
                 "trainval": "train+validation"}


# Our split names (every dataset of DATASETS has them; a TFDS dataset also
# takes TFDS slices of them, e.g. test[:100] or train[:10%]+validation).
SPLITS = ("train", "validation", "test", "trainval")
# data.resize: the short side to size / resize_ratio (aspect kept), or both
# sides (the authors' release); see transforms.resize.
RESIZE_MODES = ("short_side", "square")
# data.process_split: how processes divide the training data (see
# input_pipeline.make_train_dataset).
PROCESS_SPLITS = ("shard", "slice")


def split_names(split: str) -> list[str]:
  """The split names in a split expression: ``train[:10%]+test`` ->
  ``['train', 'test']``."""
  return [re.sub(r"\[[^\]]*\]$", "", part.strip()) for part in split.split("+")]


class DatasetNotPreparedError(FileNotFoundError, UserError):
  """A dataset's files are missing; the message says how to get them."""


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (expanded)."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR")
                            or "~/tensorflow_datasets")


def data_dir(data_cfg) -> str:
  """A data config's directory: ``data_dir`` if set, else the default."""
  return os.path.expanduser(data_cfg.get("data_dir") or default_data_dir())


@dataclasses.dataclass(frozen=True)
class FineGrained:
  """A TFDS fine-grained dataset: what to keep and how to prepare it.

  Attributes:
    name: the TFDS builder name.
    keys: our key -> TFDS feature name.
    splits: our split name -> TFDS split string.
    files: the archives TFDS downloads (what to place in the manual folder
      when a download URL fails).
    needs: Python packages the TFDS build step imports.
  """
  name: str
  keys: Mapping[str, str]
  splits: Mapping[str, str]
  files: Sequence[str]
  needs: Sequence[str] = ()

  def how_to_get(self, data_dir: str) -> str:
    """The commands that prepare the dataset in ``data_dir`` (three lines)."""
    needs = f"pip install {' '.join(self.needs)} && " if self.needs else ""
    return (
        f"dataset {self.name!r} is not prepared in {data_dir}; prepare it once "
        f"(download, then TFRecords):\n  {needs}tfds build {self.name} "
        f"--data_dir={data_dir}\nIf a download fails, put "
        f"{', '.join(self.files)} in "
        f"{os.path.join(data_dir, 'downloads', 'manual')}/ and rerun; or set "
        "data.data_dir to where it is prepared.")


_IMAGE_LABEL = {"image": "image", "label": "label"}

# Annotations kept for evaluation (TFDS feature -> our key): CUB's soft
# segmentation masks (on the bird from 128 of 255) and boxes; Cars' boxes;
# Dogs' boxes (the smallest box enclosing every dog); the Pets trimap (pet
# and outline); Flowers has labels only. Boxes are [ymin, xmin, ymax, xmax]
# normalised to the image.
FINE_GRAINED = {d.name: d for d in (
    FineGrained("caltech_birds2011",
                {**_IMAGE_LABEL, "object_mask": "segmentation_mask", "bbox": "bbox"},
                CARVED_SPLITS, ("CUB_200_2011.tgz", "segmentations.tgz"),
                ("opencv-python-headless",)),
    FineGrained("cars196", {**_IMAGE_LABEL, "bbox": "bbox"}, CARVED_SPLITS,
                ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz",
                 "cars_test_annos_withlabels.mat"), ("scipy",)),
    FineGrained("stanford_dogs", {**_IMAGE_LABEL, "bbox": "objects"},
                CARVED_SPLITS, ("images.tar", "lists.tar", "annotation.tar"),
                ("scipy",)),
    FineGrained("oxford_flowers102", dict(_IMAGE_LABEL), NATIVE_SPLITS,
                ("102flowers.tgz", "imagelabels.mat", "setid.mat"), ("scipy",)),
    FineGrained("oxford_iiit_pet",
                {**_IMAGE_LABEL, "object_mask": "segmentation_mask"},
                CARVED_SPLITS, ("images.tar.gz", "annotations.tar.gz")),
)}

DATASETS = ("parts", *FINE_GRAINED, "folder")


def default_data_config() -> ml_collections.ConfigDict:
  """The ``data`` section of a config, set for the procedural parts dataset.

  Returns:
    A ConfigDict; ``parts`` holds the generator's parameters (see
    ``parts.PartsConfig``) and split sizes. ``parts.image_size`` None means
    ``image_size``.
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = "parts"
  # A string (not None) so that --config.data.data_dir can override it;
  # empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  cfg.data_dir = ""
  cfg.image_size = 64
  cfg.resize_ratio = 0.875
  # The images are square: both modes give the same pixels.
  cfg.resize = "short_side"
  cfg.flip = True
  cfg.brightness = 0.0  # the CUB recipe: 0.126
  cfg.saturation = 0.0  # the CUB recipe: 0.5
  cfg.train_split = "train"
  cfg.eval_splits = ("validation", "test")
  cfg.shuffle_buffer = 10_000
  # How processes divide the training data: 'shard' or 'slice' (see
  # input_pipeline.make_train_dataset); 'slice' makes runs independent of
  # the process count.
  cfg.process_split = "shard"
  defaults = dataclasses.asdict(parts.PartsConfig())
  defaults["image_size"] = None
  for split, n in parts.DEFAULT_SPLIT_SIZES.items():
    defaults[f"{split}_size"] = n
  cfg.parts = ml_collections.ConfigDict(defaults)
  return cfg


def fine_grained_data_config(name: str = "caltech_birds2011", data_dir: str = "",
                             image_size: int = 448) -> ml_collections.ConfigDict:
  """The ``data`` section for a fine-grained dataset, with the CUB recipe.

  Args:
    name: a ``FINE_GRAINED`` name, or ``folder``.
    data_dir: the TFDS data directory (empty: the default), or for
      ``folder`` the folder that holds ``train/``.
    image_size: 448 (the paper) or 224.

  Returns:
    A ConfigDict with the augmentation of the paper's recipe (resize to a
    ``size / 0.875`` square, random crop, flip, brightness 0.126, saturation 0.5;
    docs/method.md#data-and-augmentation) and, for image folders, the
    ``folder`` options (see ``image_folder.ImageFolder``).
  """
  if name not in DATASETS or name == "parts":
    raise ConfigError(f"Unknown fine-grained dataset {name!r}; valid: "
                      f"{sorted(set(DATASETS) - {'parts'})}.")
  if name == "folder" and not data_dir:
    raise ConfigError("dataset=folder needs data_dir=<the folder holding "
                      "train/>.")
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  cfg.data_dir = data_dir
  cfg.image_size = image_size
  cfg.resize_ratio = 0.875
  # As the authors' release (get_transform's default): both sides to
  # size / 0.875, aspect ratio not kept; "short_side" keeps it.
  cfg.resize = "square"
  cfg.flip = True
  cfg.brightness = 0.126
  cfg.saturation = 0.5
  cfg.train_split = "train"
  cfg.eval_splits = ("validation", "test")
  cfg.shuffle_buffer = 10_000
  cfg.process_split = "shard"
  cfg.folder = ml_collections.ConfigDict(dict(
      validation_percent=float(VALIDATION_PERCENT), seed=0, verify=True,
      on_corrupt="error", max_pixels=MAX_PIXELS))
  return cfg
