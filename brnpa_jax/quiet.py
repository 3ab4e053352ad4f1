"""A quiet start: the native libraries' start-up lines kept off the screen.

Loading TensorFlow prints, twice (two of its shared libraries log it), a
warning that absl's logging is not initialised and a note that oneDNN is on;
on a machine where libtpu is installed but there is no TPU, jax's backend
start prints libtpu's failed topology probe (five lines). None of them is
for the user of a tool, and no setting turns them off without changing
something else: ``TF_CPP_MIN_LOG_LEVEL`` does not reach lines written before
absl's logging starts, ``TF_ENABLE_ONEDNN_OPTS=0`` changes TensorFlow's
numerics, and libtpu's lines ignore every log-level variable
(``TPU_STDERR_LOG_LEVEL``, ``TPU_MIN_LOG_LEVEL``, ``GLOG_minloglevel``).

So the two initialisations (``tensorflow()``: the data room's import;
``start_jax()``: the command-line tools' backend start) run with the
process's standard error (file descriptor 2) captured, and every captured
line that is not one of the known lines below is written back afterwards:
real warnings and errors still show, in order. (A process that dies inside
one of these two short windows, a native abort while TensorFlow loads, takes
what it printed there with it.)
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

# Known start-up lines, matched whole. A line of NOISE starts a block whose
# following lines matching CONTINUED are dropped with it.
NOISE = tuple(re.compile(p) for p in (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are "
    r"written to STDERR",
    r"WARNING: Logging before InitGoogle\(\) is written to STDERR",
    r"I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\. .*",
    r"I\d{4} [\d:.]+ +\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary "
    r"is optimized to use available CPU instructions .*",
    # libtpu without a TPU: its probe of the topology finds none.
    r"Failed to find host bounds for accelerator type: WARNING: could not "
    r"determine TPU accelerator type.*",
    r"E\d{4} [\d:.]+ +\d+ common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: "
    r"unexpected worker hostname 'WARNING: could not determine TPU worker "
    r"hostnames or IP addresses' from env var TPU_WORKER_HOSTNAMES\..*",
))
CONTINUED = tuple(re.compile(p) for p in (
    r"To enable the following instructions: .* rebuild TensorFlow with the "
    r"appropriate compiler flags\.",
    r"=== Source Location Trace: ===\s*",
    r"\S+\.cc:\d+",
))


def filter_noise(text: str) -> str:
  """``text`` without the known start-up lines."""
  kept, in_noise = [], False
  for line in text.splitlines(keepends=True):
    bare = line.rstrip("\n")
    if any(p.fullmatch(bare) for p in NOISE):
      in_noise = True
    elif not (in_noise and any(p.fullmatch(bare) for p in CONTINUED)):
      in_noise = False
      kept.append(line)
  return "".join(kept)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
  """Captures file descriptor 2 (what native code prints) for the block,
  then writes back what ``filter_noise`` keeps."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      with contextlib.suppress(ValueError):  # sys.stderr closed
        sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = filter_noise(capture.read().decode(errors="replace"))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def tensorflow():
  """The ``tensorflow`` module, imported the first time without its start-up
  lines (``TF_CPP_MIN_LOG_LEVEL`` defaults to 2: warnings and errors)."""
  if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with filtered_stderr():
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  return sys.modules["tensorflow"]


def start_jax() -> None:
  """Starts jax's backends (once) without libtpu's start-up lines. Call it
  after ``jax.distributed.initialize``, which must come first."""
  import jax  # pylint: disable=g-import-not-at-top
  with filtered_stderr():
    jax.devices()
