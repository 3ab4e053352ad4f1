"""Numpy batch generators as tf.data datasets (TensorFlow imported on use).

The few-shot and re-id data are numpy/Pillow code that also runs without
TensorFlow (benchmarks on machines with only jax); the trainer consumes
``tf.data`` datasets, so their tasks wrap the generators here.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from brnpa_jax import quiet


def as_tf_dataset(make_iterator: Callable[[], Iterator[dict[str, np.ndarray]]],
                  shapes: dict[str, tuple[tuple[int, ...], type]]):
  """Wraps a numpy batch generator as a prefetching ``tf.data.Dataset``.

  Args:
    make_iterator: returns a fresh iterator of batches.
    shapes: key -> ``(shape, numpy dtype)`` of each batch value.
  """
  tf = quiet.tensorflow()
  signature = {k: tf.TensorSpec(shape, tf.as_dtype(dtype))
               for k, (shape, dtype) in shapes.items()}
  ds = tf.data.Dataset.from_generator(make_iterator, output_signature=signature)
  return ds.prefetch(2)
