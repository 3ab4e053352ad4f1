"""Batch inference: the data-parallel program (``compile_inference``), the
loop that keeps it busy (``predict``), and the outputs of several processes
put back together (``gather``). Like the training steps, it imports neither
TensorFlow nor ml_collections.

``predict`` (the loop) overlaps everything it can with the model's work.
jax dispatches a compiled call and returns at once, so the loop dispatches
batch n, then takes batch n + 1 from the input pipeline (which has been
decoding it meanwhile) and starts its copy to the devices and its call,
and only then fetches the outputs of batch n - ``lag`` + 1 to the host:
neither the host nor the devices wait for the other except when one of
them is the slower. The host work per finished batch that is not needed to
continue (drawing overlays) goes to a writer thread (``on_batch``).

Under several processes (``jax.distributed``) each process predicts its
own part of the inputs on its own devices; ``gather`` then brings every
process's predictions to all of them, in process order (the order of the
inputs when each process took a contiguous part, as ``shard`` gives).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import sys
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from brnpa_jax.data.normalization import denormalize
from brnpa_jax.errors import ConfigError
from brnpa_jax.models.classifier import INFERENCE_OUTPUTS
from brnpa_jax.train import sharding as shd

LAG = 2  # batches in flight on the devices before the oldest is fetched


@dataclasses.dataclass
class Predictions:
  """Outputs of ``predict`` over all inputs, padding removed.

  Attributes:
    files: the inputs' names, in order.
    labels: their labels (dataset splits), or None.
    outputs: ``probs`` (N, classes), ``maps`` (N, K, h, w), ``norms``
      (N, h, w).
    model_seconds: time the host waited for the model's outputs (the
      model's share of the run when it is the slower side).
    compile_seconds: compiling, on the first batch.
    total_seconds: the whole run.
    images: uint8 display images (for overlays), when kept.
    input_seconds: time the host waited for the input pipeline.
  """
  files: list[str]
  labels: np.ndarray | None
  outputs: dict[str, np.ndarray]
  model_seconds: float
  compile_seconds: float
  total_seconds: float
  images: list[np.ndarray] | None = None
  input_seconds: float = 0.0


def compile_inference(infer, variables, image_shape: Sequence[int],
                      mesh: jax.sharding.Mesh):
  """``infer(variables, images)`` compiled data-parallel on ``mesh``.

  The images' batch axis is split over every device of the mesh and the
  variables are replicated on each (placed once, here), as the training
  steps place batches and parameters with ``fsdp = 1``; the outputs stay
  split. Each device runs the program that one device would run on its
  ``batch / devices`` images, so for a given batch per device the outputs
  are the same on any number of devices, bit for bit.

  Args:
    infer: ``(variables, images) -> outputs``, e.g.
      ``models.classifier.make_infer_fn(model)``.
    variables: the model variables (host or device arrays).
    image_shape: ``(batch, S, S, 3)``; the batch must divide over the mesh.
    mesh: from ``sharding.make_mesh``.

  Returns:
    ``images -> outputs``: dispatches and returns at once (jax's
    asynchronous dispatch); the host-to-device copy of ``images`` is started
    first, so it overlaps with the computation of earlier calls.

  Raises:
    ConfigError: the batch does not divide over the devices.
  """
  shd.check_batch_size(image_shape[0], mesh, "batch", num_processes=1)
  batch = shd.data_sharding(mesh)
  variables = jax.device_put(variables, shd.replicated(mesh))
  compiled = jax.jit(infer, out_shardings=batch).lower(
      variables, jax.ShapeDtypeStruct(tuple(image_shape), jax.numpy.float32,
                                      sharding=batch)).compile()
  return lambda images: compiled(variables, jax.device_put(images, batch))


def shard(items: Sequence, index: int, count: int) -> Sequence:
  """Process ``index``'s contiguous part of ``items`` (the first
  ``len % count`` parts one longer, as ``tfds.even_splits``)."""
  size, extra = divmod(len(items), count)
  start = index * size + min(index, extra)
  return items[start:start + size + (index < extra)]


def predict(batches: Iterable, compile_fn: Callable, *,
            keep_images: bool = False, lag: int = LAG,
            on_batch: Callable | None = None, allow_empty: bool = False
            ) -> Predictions | None:
  """Runs the compiled inference on every batch (one shape, one compile).

  Args:
    batches: ``(names, images (batch, S, S, 3), labels | None)`` iterator;
      rows past ``len(names)`` are padding.
    compile_fn: ``images -> compiled (images -> {'probs', 'maps', 'norms'})``,
      called on the first batch and timed apart from the run; the compiled
      function may return device arrays at once (asynchronous dispatch).
    keep_images: keep the display images (for overlays).
    lag: batches dispatched before the oldest one's outputs are fetched.
    on_batch: ``on_batch(start, names, outputs, images | None)`` for each
      finished batch (``start``: its first row in the run; ``outputs``
      without padding; ``images`` uint8 when ``keep_images``), run in order
      on one writer thread while the loop goes on; its errors are raised
      here (at the next batch, or at the end).
    allow_empty: return None when there was nothing to predict on (a
      process's part of the inputs under ``gather``).

  Raises:
    ConfigError: there was nothing to predict on.
  """
  t_start = time.perf_counter()
  files, labels, chunks, shown = [], [], [], []
  wait_model = wait_input = compile_s = 0.0
  compiled = None
  in_flight = collections.deque()
  writer = concurrent.futures.ThreadPoolExecutor(1) if on_batch else None
  written = collections.deque()

  def finish(names, images, out):
    nonlocal wait_model
    n = len(names)
    t = time.perf_counter()
    chunk = {k: np.asarray(out[k])[:n] for k in INFERENCE_OUTPUTS}
    wait_model += time.perf_counter() - t
    shown_now = list(denormalize(images[:n])) if keep_images else None
    if writer is not None:
      while written and written[0].done():  # a failed write stops the run
        written.popleft().result()
      written.append(writer.submit(on_batch, len(files), names, chunk, shown_now))
    chunks.append(chunk)
    files.extend(names)
    if keep_images:
      shown.extend(shown_now)

  try:
    iterator = iter(batches)
    while True:
      t = time.perf_counter()
      item = next(iterator, None)
      wait_input += time.perf_counter() - t
      if item is None:
        break
      names, images, batch_labels = item
      if compiled is None:
        t = time.perf_counter()
        compiled = compile_fn(images)
        compile_s = time.perf_counter() - t
      in_flight.append((names, images, compiled(images)))
      if batch_labels is not None:
        labels.append(batch_labels)
      if len(in_flight) >= max(lag, 1):
        finish(*in_flight.popleft())
    while in_flight:
      finish(*in_flight.popleft())
    for future in written:
      future.result()
  finally:
    if writer is not None:
      writer.shutdown(wait=True, cancel_futures=True)
  if not files:
    if allow_empty:
      return None
    raise ConfigError("no inputs to predict on (every image was skipped).")
  outputs = {k: np.concatenate([c[k] for c in chunks]) for k in INFERENCE_OUTPUTS}
  bad = ~np.all([np.isfinite(v.reshape(len(files), -1)).all(1)
                 for v in outputs.values()], axis=0)
  if bad.any():  # written as they are, but never silently
    print(f"Warning: the outputs of {bad.sum()} of {len(files)} inputs hold "
          "NaN or Inf: the model's weights are likely not finite.",
          file=sys.stderr, flush=True)
  return Predictions(files, np.concatenate(labels) if labels else None, outputs,
                     wait_model, compile_s, time.perf_counter() - t_start,
                     shown if keep_images else None, wait_input)


def _allgather(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Every process's ``rows`` (``counts[p]`` of them on process p),
  concatenated in process order."""
  padded = np.zeros((max(int(counts.max()), 1), *rows.shape[1:]), rows.dtype)
  padded[:len(rows)] = rows
  every = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([every[p, :c] for p, c in enumerate(counts)])


def _names_to_rows(files: Sequence[str], width: int) -> np.ndarray:
  rows = np.zeros((len(files), width), np.uint8)
  for i, name in enumerate(files):
    raw = name.encode("utf-8", "surrogateescape")
    rows[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  return rows


def gather(preds: Predictions | None) -> Predictions:
  """Every process's predictions, concatenated in process order, on all
  processes (a collective: every process calls it, in the same order).

  Args:
    preds: this process's predictions; None when it had nothing to predict
      on (its part of the inputs was empty, or every file was skipped).

  Raises:
    ConfigError: no process had anything to predict on.
  """
  # What each process holds: row count, name width, flags, trailing shapes.
  shapes = {k: (() if preds is None else preds.outputs[k].shape[1:])
            for k in INFERENCE_OUTPUTS}
  image = () if preds is None or preds.images is None else preds.images[0].shape
  files = [] if preds is None else preds.files
  meta = np.array([len(files),
                   max((len(f.encode("utf-8", "surrogateescape"))
                        for f in files), default=0),
                   preds is not None and preds.labels is not None,
                   preds is not None and preds.images is not None,
                   *(shapes["probs"] or (0,)), *(shapes["maps"] or (0, 0, 0)),
                   *(image or (0, 0, 0))], np.int64)
  times = np.array([0.0] * 4 if preds is None else [
      preds.model_seconds, preds.compile_seconds, preds.total_seconds,
      preds.input_seconds])
  every = np.asarray(multihost_utils.process_allgather(meta)).reshape(-1, len(meta))
  counts, width = every[:, 0], int(every[:, 1].max())
  if not counts.sum():
    raise ConfigError("no inputs to predict on (every image was skipped).")
  has_labels, has_images = bool(every[:, 2].any()), bool(every[:, 3].any())
  classes, k, h, w, s, _, _ = every[:, 4:].max(0)
  empty = {"probs": (classes,), "maps": (k, h, w), "norms": (h, w)}
  outputs = {key: _allgather(preds.outputs[key] if preds else
                             np.zeros((0, *empty[key]), np.float32), counts)
             for key in INFERENCE_OUTPUTS}
  names = _allgather(_names_to_rows(files, max(width, 1)), counts)
  files = [bytes(r).rstrip(b"\0").decode("utf-8", "surrogateescape")
           for r in names]
  labels = images = None
  if has_labels:
    labels = _allgather(preds.labels if preds else np.zeros((0,), np.int32),
                        counts)
  if has_images:
    images = list(_allgather(np.stack(preds.images) if preds else
                             np.zeros((0, s, s, 3), np.uint8), counts))
  seconds = np.asarray(multihost_utils.process_allgather(times)).reshape(
      -1, 4).max(0)
  return Predictions(files, labels, outputs, float(seconds[0]),
                     float(seconds[1]), float(seconds[2]), images,
                     float(seconds[3]))
