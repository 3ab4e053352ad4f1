"""Metric writers: TensorBoard events and logs (clu) plus a JSON-lines file."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from brnpa_jax import outputs, quiet

quiet.tensorflow()  # clu's writers import it: first without its start-up lines
from clu import metric_writers  # pylint: disable=g-import-not-at-top
from clu.metric_writers import interface  # pylint: disable=g-import-not-at-top


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON object per ``write_scalars`` call to ``metrics.jsonl``.

  Reading it back is ``[json.loads(l) for l in open(path)]``; each row has
  ``step`` plus the scalars written at that step.
  """

  def __init__(self, path: str):
    self._path = path
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")

  # Only scalars go to the JSON file; everything else goes to TensorBoard.
  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._file.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}})
                     + "\n")

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class _NamingErrors(interface.MetricWriter):
  """A writer whose failures caused by the file system are ``OSError``s
  naming the workdir (``outputs.naming``): on a full disk, clu's TensorBoard
  writer raises them wrapped, and the JSON file without a file name."""

  def __init__(self, writer: interface.MetricWriter, workdir: str):
    self._writer, self._workdir = writer, workdir

  def _call(self, method: str, *args, **kwargs):
    with outputs.naming(self._workdir):
      return getattr(self._writer, method)(*args, **kwargs)

  write_summaries = functools.partialmethod(_call, "write_summaries")
  write_scalars = functools.partialmethod(_call, "write_scalars")
  write_images = functools.partialmethod(_call, "write_images")
  write_videos = functools.partialmethod(_call, "write_videos")
  write_audios = functools.partialmethod(_call, "write_audios")
  write_texts = functools.partialmethod(_call, "write_texts")
  write_histograms = functools.partialmethod(_call, "write_histograms")
  write_hparams = functools.partialmethod(_call, "write_hparams")
  flush = functools.partialmethod(_call, "flush")
  close = functools.partialmethod(_call, "close")


def create_writer(workdir: str) -> interface.MetricWriter:
  """TensorBoard + logging + JSON lines on process 0; logging elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return _NamingErrors(metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=True),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ]), workdir)
