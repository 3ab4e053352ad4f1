"""Per-example image transforms (TensorFlow ops) shared by every dataset.

The recipe of docs/method.md#data-and-augmentation: for training, resize to
``size / resize_ratio``, random-crop ``size``, flip horizontally with p=0.5,
jitter brightness and saturation, normalise with the ImageNet mean and std;
for evaluation, resize and centre-crop. The resize is ``short_side`` (the
short side to ``size / resize_ratio``, aspect ratio kept: torchvision's
``Resize(int)``) or ``square`` (both sides, aspect ratio not kept:
``Resize((s, s))``, what the authors' release does by default). Geometric steps apply jointly to the
image and to its masks (nearest-neighbour resizing keeps masks binary), so
localisation metrics compare maps and masks pixel for pixel.

Randomness is stateless: each random op takes a ``[2]`` integer seed, which
the pipeline derives from (seed, epoch, example index), so an epoch's
augmentation is reproducible and independent of tf.data's threading.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from brnpa_jax.data import catalog
from brnpa_jax.data.normalization import (  # re-exported
    IMAGENET_MEAN, IMAGENET_STD, denormalize, resize_size)


def resized_shape(hw, short_side: int):
  """[2] int32 (H, W) after resizing the short side to ``short_side``."""
  h, w = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
  short = tf.minimum(h, w)
  # torchvision's int(short_side * long / short): multiplying first keeps a
  # square image square (h * (s / h) can round to s - 1).
  return tf.stack([tf.cast(short_side * h / short, tf.int32),
                   tf.cast(short_side * w / short, tf.int32)])


def resize_short_side(image, masks: dict, short_side: int):
  """Resizes so the short side is ``short_side``, keeping the aspect ratio.

  Args:
    image: float32 (H, W, 3) in [0, 1]; bilinear with anti-aliasing.
    masks: dict of (H, W, 1) integer masks; nearest neighbour.
    short_side: target length of the shorter side.

  Returns:
    (image, masks) resized.
  """
  new_hw = resized_shape(tf.shape(image)[:2], short_side)
  image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
  masks = {k: tf.image.resize(m, new_hw, method="nearest") for k, m in masks.items()}
  return image, masks


def resize(image, masks: dict, side: int, mode: str = "short_side"):
  """Resizes image and masks to ``side`` (see the module docstring)."""
  if mode not in catalog.RESIZE_MODES:
    raise ValueError(f"resize={mode!r}: use one of {catalog.RESIZE_MODES}.")
  if mode == "short_side":
    return resize_short_side(image, masks, side)
  image = tf.image.resize(image, (side, side), method="bilinear", antialias=True)
  masks = {k: tf.image.resize(m, (side, side), method="nearest")
           for k, m in masks.items()}
  return image, masks


def crop(image, masks: dict, top, left, size: int):
  """Crops a ``size`` x ``size`` window at (top, left) from all inputs."""
  cut = lambda x: x[top:top + size, left:left + size]
  image, masks = cut(image), {k: cut(m) for k, m in masks.items()}
  image = tf.ensure_shape(image, (size, size, 3))
  masks = {k: tf.ensure_shape(m, (size, size, 1)) for k, m in masks.items()}
  return image, masks


def random_crop(image, masks: dict, size: int, seed):
  """Crops a random ``size`` window (the same for image and masks)."""
  shape = tf.shape(image)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  top = tf.random.stateless_uniform([], seeds[0], 0, shape[0] - size + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[1], 0, shape[1] - size + 1, tf.int32)
  return crop(image, masks, top, left, size)


def center_offsets(hw, size: int):
  """(top, left) int32 of the central ``size`` window (torchvision's rounding)."""
  return (tf.cast(tf.round((hw[0] - size) / 2), tf.int32),
          tf.cast(tf.round((hw[1] - size) / 2), tf.int32))


def center_crop(image, masks: dict, size: int):
  """Crops the central ``size`` window (torchvision's rounding)."""
  top, left = center_offsets(tf.shape(image), size)
  return crop(image, masks, top, left, size)


def random_flip(image, masks: dict, seed):
  """Flips image and masks left-right together with probability 0.5."""
  do_flip = tf.random.stateless_uniform([], seed) < 0.5
  flip = lambda x: tf.cond(do_flip, lambda: tf.reverse(x, [1]), lambda: x)
  return flip(image), {k: flip(m) for k, m in masks.items()}


def color_jitter(image, brightness: float, saturation: float, seed):
  """torchvision's ``ColorJitter(brightness, saturation)`` on [0, 1] images.

  Brightness multiplies by a factor in ``[1 - b, 1 + b]``; saturation blends
  with the grey image by a factor in ``[1 - s, 1 + s]``. torchvision draws the
  order of the two at random; here brightness always goes first (the two
  commute up to clipping).

  Args:
    image: float32 (H, W, 3) in [0, 1].
    brightness: jitter strength, 0 to disable.
    saturation: jitter strength, 0 to disable.
    seed: [2] integer seed.

  Returns:
    The jittered image, clipped to [0, 1].
  """
  seeds = tf.random.experimental.stateless_split(seed, 2)
  if brightness > 0:
    factor = tf.random.stateless_uniform(
        [], seeds[0], max(0.0, 1 - brightness), 1 + brightness)
    image = tf.clip_by_value(image * factor, 0.0, 1.0)
  if saturation > 0:
    factor = tf.random.stateless_uniform(
        [], seeds[1], max(0.0, 1 - saturation), 1 + saturation)
    grey = tf.image.rgb_to_grayscale(image)
    image = tf.clip_by_value(grey + factor * (image - grey), 0.0, 1.0)
  return image


def normalize(image):
  """[0, 1] RGB -> ImageNet-normalised float32."""
  return (image - IMAGENET_MEAN) / IMAGENET_STD


def train_transform(image, masks: dict, seed, *, size: int,
                    resize_ratio: float = 0.875, flip: bool = True,
                    brightness: float = 0.0, saturation: float = 0.0,
                    resize_mode: str = "short_side"):
  """Training augmentation of one example.

  Args:
    image: uint8 (H, W, 3).
    masks: dict of uint8 (H, W, 1) masks, transformed geometrically with the
      image (may be empty).
    seed: [2] integer seed of this example.
    size: output side.
    resize_ratio: crop fraction; the image is resized to
      ``size / resize_ratio`` first.
    flip: random horizontal flips.
    brightness: brightness jitter (0.126 in the CUB recipe).
    saturation: saturation jitter (0.5 in the CUB recipe).
    resize_mode: ``short_side`` or ``square`` (module docstring).

  Returns:
    (image float32 (size, size, 3) normalised, masks uint8 (size, size, 1)).
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = tf.image.convert_image_dtype(image, tf.float32)
  image, masks = resize(image, masks, resize_size(size, resize_ratio), resize_mode)
  image, masks = random_crop(image, masks, size, seeds[0])
  if flip:
    image, masks = random_flip(image, masks, seeds[1])
  image = color_jitter(image, brightness, saturation, seeds[2])
  return normalize(tf.clip_by_value(image, 0.0, 1.0)), masks


def eval_transform(image, masks: dict, *, size: int, resize_ratio: float = 0.875,
                   resize_mode: str = "short_side"):
  """Evaluation transform: resize, centre-crop, normalise.

  Args:
    image: uint8 (H, W, 3).
    masks: dict of uint8 (H, W, 1) masks (may be empty).
    size: output side.
    resize_ratio: as in ``train_transform``.
    resize_mode: as in ``train_transform``.

  Returns:
    (image float32 (size, size, 3) normalised, masks uint8 (size, size, 1)).
  """
  image = tf.image.convert_image_dtype(image, tf.float32)
  image, masks = resize(image, masks, resize_size(size, resize_ratio), resize_mode)
  image, masks = center_crop(image, masks, size)
  return normalize(tf.clip_by_value(image, 0.0, 1.0)), masks


def binarize(masks: dict, keys: Sequence[str] | None = None) -> dict:
  """(S, S, 1) integer masks -> float32 (S, S) in {0, 1} (nonzero is 1)."""
  keys = masks.keys() if keys is None else keys
  return {k: tf.cast(masks[k][..., 0] > 0, tf.float32) for k in keys}


def eval_box(box, image_hw, *, size: int, resize_ratio: float = 0.875,
             resize_mode: str = "short_side"):
  """Maps a box through ``eval_transform``'s resize and centre crop.

  Args:
    box: float (4,) ``[ymin, xmin, ymax, xmax]`` normalised to the original
      image (the TFDS ``BBoxFeature`` convention).
    image_hw: [2] integer (H, W) of the original image.
    size: output side.
    resize_ratio: as in ``eval_transform``.
    resize_mode: as in ``eval_transform``.

  Returns:
    float32 (4,) ``[ymin, xmin, ymax, xmax]`` normalised to the ``size`` x
    ``size`` crop, clipped to [0, 1] (a box outside the crop collapses onto
    its border: zero area).
  """
  side = resize_size(size, resize_ratio)
  hw = (resized_shape(image_hw, side) if resize_mode == "short_side"
        else tf.constant([side, side], tf.int32))
  top, left = center_offsets(hw, size)
  hw_f = tf.cast(hw, tf.float32)
  scale = tf.stack([hw_f[0], hw_f[1], hw_f[0], hw_f[1]])
  offset = tf.cast(tf.stack([top, left, top, left]), tf.float32)
  out = (tf.cast(box, tf.float32) * scale - offset) / size
  return tf.clip_by_value(out, 0.0, 1.0)
