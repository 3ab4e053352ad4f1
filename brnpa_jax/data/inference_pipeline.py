"""The parallel file pipeline of batch inference: image files -> fixed batches.

``predict`` reads a folder of files. Each file is decoded by the project's
one decoder (``image_files.read_image``, called through
``tf.numpy_function``: Pillow releases the GIL while it decodes) and
resized and centre-cropped by the evaluation transform
(``transforms.eval_transform``), in a tf.data map that runs ``workers``
files at once (0: tf.data's autotuning, which follows the machine's cores).
The map is deterministic, so files come out in the order given whatever
finishes first, and the pipeline holds at most ``prefetch`` batches ahead of
its reader: memory is bounded by the batch size, not by the folder.

A file that cannot be read does not stop the map: it comes out with its
error message and no pixels, and ``batches`` handles it in file order, as
the serial reader did: an error naming it (``on_corrupt='error'``), or a
warning and the file left out (``'skip'``), the following files moving up
to fill the batch. Every batch has the same shape (the last one is padded
with zeros), so the model compiles once.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator, Sequence

import numpy as np

from brnpa_jax import quiet
from brnpa_jax.data import image_files, transforms
from brnpa_jax.errors import ConfigError

tf = quiet.tensorflow()

# Batches decoded ahead of the consumer (each float32 (batch, S, S, 3)).
PREFETCH = 2
_EMPTY = np.zeros((1, 1, 3), np.uint8)  # a file that did not decode


def _read(path: bytes, max_pixels: int):
  """``(pixels, error)``: the decoded file, or a placeholder and the message."""
  try:
    return image_files.read_image(path, max_pixels=max_pixels), b""
  except image_files.CorruptImageError as e:
    return _EMPTY, str(e).encode("utf-8", "backslashreplace")


def file_dataset(paths: Sequence[str], *, size: int, resize_ratio: float,
                 resize_mode: str = "short_side", batch: int,
                 max_pixels: int = image_files.MAX_PIXELS, workers: int = 0,
                 prefetch: int = PREFETCH) -> tf.data.Dataset:
  """Batches of ``{'image' float32 (b, S, S, 3), 'error' string (b,)}``.

  Args:
    paths: the files, in the order wanted.
    size: S, the model's input side.
    resize_ratio: as in ``transforms.eval_transform``.
    resize_mode: as in ``transforms.eval_transform``.
    batch: files per batch (the last batch may be smaller).
    max_pixels: larger images fail to decode (``image_files``).
    workers: files decoded at once; 0: autotuned to the machine.
    prefetch: batches kept ready ahead of the consumer.

  Returns:
    The dataset; ``error`` is empty for a file that decoded, else its
    message (and the image is meaningless).
  """
  # A function call kept out of the map's graph ("_noinline"): TensorFlow
  # optimises its body as it optimises any tf.function (constant folding
  # included), so the pixels are those of the transform run alone, bit for
  # bit; inlined into the map, float rounding differs in the last bit.
  @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
               experimental_attributes={"_noinline": True})
  def transform(pixels):
    return transforms.eval_transform(pixels, {}, size=size,
                                     resize_ratio=resize_ratio,
                                     resize_mode=resize_mode)[0]

  def load(path):
    pixels, error = tf.numpy_function(
        lambda p: _read(p, max_pixels), [path], (tf.uint8, tf.string),
        stateful=False)
    image = transform(tf.ensure_shape(pixels, (None, None, 3)))
    return {"image": image, "error": tf.ensure_shape(error, ())}

  ds = tf.data.Dataset.from_tensor_slices(
      np.array([os.fsencode(p) for p in paths], dtype=object))
  ds = ds.map(load, num_parallel_calls=workers or tf.data.AUTOTUNE,
              deterministic=True)
  return ds.batch(batch).prefetch(prefetch)


def batches(folder: str, names: Sequence[str], *, size: int,
            resize_ratio: float, batch: int, on_corrupt: str = "error",
            resize_mode: str = "short_side",
            max_pixels: int = image_files.MAX_PIXELS, workers: int = 0
            ) -> Iterator[tuple[list[str], np.ndarray, None]]:
  """``(files, images (batch, S, S, 3) float32, None)`` in the order of
  ``names``; the last batch zero-padded.

  Args:
    folder: the folder ``names`` are relative to.
    names: the files to read (``image_files.list_images``).
    size, resize_ratio, resize_mode, max_pixels, workers: as in
      ``file_dataset``.
    batch: rows per batch.
    on_corrupt: ``'error'``: a file that does not decode stops the run with
      a ``ConfigError`` naming it; ``'skip'``: a warning, and it is left out.

  ``files`` are ``image_files.display_name`` of ``names``.
  """
  if on_corrupt not in image_files.ON_CORRUPT:
    raise ConfigError(f"--on_corrupt={on_corrupt!r}: use one of "
                      f"{image_files.ON_CORRUPT}.")
  if not names:
    return
  ds = file_dataset([os.path.join(folder, n) for n in names], size=size,
                    resize_ratio=resize_ratio, resize_mode=resize_mode,
                    batch=batch, max_pixels=max_pixels, workers=workers)
  shown = [image_files.display_name(n) for n in names]
  start = 0  # index in names of the batch's first file
  kept_names, kept = [], []  # rows waiting for a full batch (after a skip)
  # The warnings wait for the first readable image: a folder where none is
  # readable is one error, not a warning per file before it.
  skipped, read_one = [], False
  for ex in ds.as_numpy_iterator():
    images, errors = ex["image"], ex["error"]
    n = len(errors)
    batch_names = shown[start:start + n]
    start += n
    if not kept and n == batch and not any(errors):
      read_one = _flush_warnings(skipped)
      yield batch_names, images, None  # the common case: no copy
      continue
    for name, image, error in zip(batch_names, images, errors):
      if error:
        message = error.decode("utf-8")
        if on_corrupt == "error":
          raise ConfigError(f"cannot decode {message}; fix or remove it, or "
                            "pass --on_corrupt=skip.")
        skipped.append(f"Warning: skipped {message}")
        if read_one:
          _flush_warnings(skipped)
        continue
      read_one = _flush_warnings(skipped)
      kept_names.append(name)
      kept.append(image)
      if len(kept) == batch:
        yield kept_names, np.stack(kept), None
        kept_names, kept = [], []
  if not read_one:
    raise ConfigError(
        f"no image under {image_files.message_name(folder)} could be read: "
        f"{len(skipped)} skipped (the first: "
        f"{skipped[0].removeprefix('Warning: skipped ')}).")
  if kept:
    padded = np.zeros((batch, size, size, 3), np.float32)
    padded[:len(kept)] = kept
    yield kept_names, padded, None


def _flush_warnings(skipped: list[str]) -> bool:
  """Prints and empties the waiting warnings; True (an image was read)."""
  for line in skipped:
    print(line, file=sys.stderr, flush=True)
  skipped.clear()
  return True
