"""Orbax checkpoints of a run: the newest states (for resuming) and the best.

Both live in the workdir: ``checkpoints/`` keeps the most recent steps,
``best/`` the state with the highest validation score. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint intact. A checkpoint damaged later
(a truncated file, a disk error) is reported and the next older one is
used; the damaged one is moved to ``damaged_checkpoints/`` in the workdir,
not deleted. Only when no checkpoint restores is it an error.

A save that the file system refuses (no space left, a quota, a read-only
remount) fails in orbax's background threads and surfaces at a later save
or wait: it is then reported once, as an ``OSError`` naming the workdir
(the command-line tools print it as one line), its temporary directory is
removed, and the background threads' own reports of the same failure are
not printed. The checkpoints written before it are complete, so the same
command resumes from the newest once space is freed; temporary directories
that a killed run left behind are removed when the run resumes (orbax's
``cleanup_tmp_directories``).

Testing hook (fault injection): with ``BRNPA_FAULT=checkpoint_save:<step>``
in the environment the process kills itself (SIGKILL) in the middle of
writing that step's checkpoint in ``checkpoints/``: after orbax has written
every file of it into the temporary directory and before it renames that
directory (orbax's ``post_finalization_callback``). The chaos test uses it to
kill inside a write deterministically; unset, nothing is added.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from brnpa_jax.outputs import os_errno
from brnpa_jax.runs.workdir import DAMAGED_DIR, RunError, Workdir

_log = logging.getLogger(__name__)


class _BackgroundReports(logging.Filter):
  """Drops orbax's and asyncio's log records of a failed write: the run
  reports that failure itself, once (``Checkpointer``)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "absl" and "orbax" not in record.pathname:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return (os_errno(exc) is None
            and os_errno(Exception(record.getMessage())) is None)


def _in_orbax(report) -> bool:
  """Whether an unraisable exception was raised in orbax's code."""
  tb = report.exc_traceback
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  code = getattr(report.object, "cr_code", None)  # a coroutine left behind
  return code is not None and "orbax" in code.co_filename


def _unraisable(hook):
  """``sys.unraisablehook`` without the echoes of a failed write: orbax's
  event loop closes on the first failed write while tensorstore's other
  writes still call back into it, and its unfinished writes are collected."""
  def filtered(report):
    echo = ((isinstance(report.exc_value, RuntimeError)
             and str(report.exc_value) == "Event loop is closed")
            or (_in_orbax(report)
                and os_errno(report.exc_value) is not None))
    if not echo:
      hook(report)
  filtered.brnpa_filtered = True
  return filtered


def _quiet_background_failures() -> None:
  """Installs the filters above, once per process."""
  if getattr(sys.unraisablehook, "brnpa_filtered", False):
    return
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_BackgroundReports())
  sys.unraisablehook = _unraisable(sys.unraisablehook)


def _remove_temporaries(*directories: str, settle: float = 1.0) -> None:
  """Removes orbax's temporary (unfinished) checkpoints in ``directories``.

  The writes of a failed save that were under way when it failed go on for
  a moment (tensorstore's operations outlive orbax's event loop) and may
  create their folders again: removal repeats until none has reappeared
  for ``settle`` seconds (at most 20 times that).
  """
  quiet = time.monotonic()
  for _ in range(200):
    for directory in directories:
      names = os.listdir(directory) if os.path.isdir(directory) else []
      for name in names:
        if ocp.path.step.TMP_DIR_SUFFIX in name:
          path = os.path.join(directory, name)
          shutil.rmtree(path, ignore_errors=True)
          if not os.path.exists(path):
            quiet = time.monotonic()
    if time.monotonic() - quiet >= settle:
      return
    time.sleep(settle / 10)


FAULT_ENV = "BRNPA_FAULT"


def _fault_step() -> int | None:
  """The step of ``BRNPA_FAULT=checkpoint_save:<step>`` (module docstring)."""
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return None
  point, _, step = spec.partition(":")
  if point != "checkpoint_save" or not step.isdigit():
    raise ValueError(f"{FAULT_ENV}={spec!r}: the one fault point is "
                     "checkpoint_save:<step>.")
  return int(step)


def _warn(msg: str) -> None:
  _log.warning(msg)
  if jax.process_index() == 0:
    print("Warning: " + msg, flush=True)


def _first_restorable(mgr: ocp.CheckpointManager, restore: Callable[[int], Any]
                      ) -> tuple[Any, int | None, list[int]]:
  """``(restored, step, damaged steps)``: the newest step that restores.

  A step that fails while an older one restores was damaged (every
  checkpoint of a run has the same structure). When none restores, the
  failure is not damage but a mismatch or a broken directory: a RunError.
  """
  failures: list[tuple[int, Exception]] = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      restored = restore(step)
    except Exception as e:  # pylint: disable=broad-except  # any read failure
      failures.append((step, e))
      continue
    for bad, e in failures:
      _warn(f"checkpoint {os.path.join(str(mgr.directory), str(bad))} does not "
            f"restore ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"using step {step} instead.")
    return restored, step, [bad for bad, _ in failures]
  if failures:
    step, e = failures[0]
    raise RunError(
        f"No checkpoint in {mgr.directory} restores (steps "
        f"{sorted(s for s, _ in failures)}); the newest fails with "
        f"{type(e).__name__}: {str(e).splitlines()[0][:300]}. Move the "
        "directory aside to start this run over.") from e
  return None, None, []


def _set_aside(workdir: str, mgr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged step directories out of the manager's directory."""
  if steps and jax.process_index() == 0:
    target = os.path.join(workdir, DAMAGED_DIR)
    os.makedirs(target, exist_ok=True)
    for step in steps:
      src = os.path.join(str(mgr.directory), str(step))
      if not os.path.isdir(src):
        continue
      base = os.path.join(target, f"{os.path.basename(str(mgr.directory))}_{step}")
      dst, n = base, 1
      while os.path.exists(dst):
        dst, n = f"{base}.{n}", n + 1
      shutil.move(src, dst)
      _warn(f"moved the damaged checkpoint to {dst}.")
  if steps:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    mgr.reload()


@contextlib.contextmanager
def _quiet():
  """Hides absl's INFO and WARNING lines (orbax's chatter) for a block."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def restore_variables(workdir: str, checkpoint: str = "auto"):
  """``(variables, step, which)`` of a run's best (else latest) checkpoint.

  Read-only: only ``params`` and ``batch_stats`` are read (not the optimiser
  state), onto the first local device, whatever mesh the run was trained
  on. A damaged newest checkpoint is skipped with a warning.

  Args:
    workdir: the run's workdir.
    checkpoint: ``best``, ``latest`` or ``auto`` (best, else latest).
  """
  wd = Workdir(workdir)
  dirs = {"best": wd.best_dir, "latest": wd.checkpoints_dir}
  if checkpoint not in ("auto", *dirs):
    raise ValueError(f"checkpoint must be best, latest or auto, got {checkpoint!r}.")
  order = list(dirs) if checkpoint == "auto" else [checkpoint]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for which in order:
    path = dirs[which]
    if not os.path.isdir(path):
      continue
    with _quiet():  # orbax warns that a read-only manager will not save
      mgr = ocp.CheckpointManager(
          path, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(read_only=True, create=False))

    def restore(step):
      tree = mgr.item_metadata(step)["state"].tree
      target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(
          m.shape, m.dtype, sharding=device), tree[k])
                for k in ("params", "batch_stats") if k in tree}
      return mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True),
          meta=ocp.args.JsonRestore()))

    try:
      restored, step, _ = _first_restorable(mgr, restore)
    finally:
      mgr.close()
    if restored is not None:
      return dict(restored.state), int(step), which
  raise FileNotFoundError(
      f"no checkpoint ({checkpoint}) in {wd.best_dir} or {wd.checkpoints_dir}: "
      "train first (python train.py --config ... --workdir WORKDIR).")


def abstract_like(state_shapes, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target of a state."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      state_shapes, shardings)


class Checkpointer:
  """Latest and best checkpoints of one run.

  Each checkpoint holds the train state and a small JSON ``meta`` dict
  (epoch, best score so far, ...), so a resumed run knows what was best.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self._workdir = Workdir(workdir)
    _quiet_background_failures()
    # A killed run's unfinished checkpoints are removed before the first save.
    opts = lambda n: ocp.CheckpointManagerOptions(
        max_to_keep=n, create=True, cleanup_tmp_directories=True)
    latest_opts = opts(max_to_keep)
    self._fault, self._fault_writing = _fault_step(), None
    if self._fault is not None:
      latest_opts.async_options = ocp.AsyncOptions(
          post_finalization_callback=self._die_at_fault)
    self._latest = ocp.CheckpointManager(
        self._workdir.checkpoints_dir, options=latest_opts,
        item_names=("state", "meta"))
    self._best = ocp.CheckpointManager(
        self._workdir.best_dir, options=opts(1), item_names=("state", "meta"))
    self._closed = False

  @contextlib.contextmanager
  def _writing(self) -> Iterator[None]:
    """Turns a write the file system refused into one ``OSError`` naming the
    workdir, after the background work has ended and the unfinished
    checkpoint is removed; other failures pass unchanged."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      code = os_errno(e)
      if code is None or self._closed:
        raise
      self._closed = True
      for mgr in (self._latest, self._best):
        with contextlib.suppress(Exception):  # the same failure, again
          mgr.close()
      with contextlib.suppress(OSError):  # a read-only file system
        _remove_temporaries(self._workdir.checkpoints_dir,
                            self._workdir.best_dir)
      raise OSError(code, os.strerror(code), self._workdir.path) from e

  @property
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  @property
  def best_step(self) -> int | None:
    return self._best.latest_step()

  def save(self, step: int, state, meta: dict[str, Any], *, best: bool = False,
           force: bool = False) -> None:
    """Saves asynchronously; ``best`` also replaces the best checkpoint.

    Raises:
      OSError: this or an earlier save was refused by the file system
        (``errno`` says why; the filename is the workdir).
    """
    # The best first: a resume point (latest) whose meta names a best step
    # is written only once that best checkpoint is complete.
    managers = ([self._best] if best else []) + [self._latest]
    with self._writing():
      for i, mgr in enumerate(managers):
        if mgr.latest_step() == step:
          continue  # already saved at this step (a preemption after an epoch)
        if i > 0:
          # Orbax names its multi-host commit barriers by step alone, so two
          # managers committing the same step at once collide ("barrier
          # already ongoing"): let the first finish before the second starts.
          managers[i - 1].wait_until_finished()
        if self._fault is not None and mgr is self._latest:
          mgr.wait_until_finished()  # the previous step's write has ended
          self._fault_writing = step
        mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)

  def _die_at_fault(self) -> None:
    """Orbax's callback between writing a checkpoint and renaming it."""
    if self._fault_writing == self._fault:
      os.kill(os.getpid(), signal.SIGKILL)

  def _restore(self, mgr, abstract_state):
    restore = lambda step: mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    restored, _, damaged = _first_restorable(mgr, restore)
    _set_aside(self._workdir.path, mgr, damaged)
    if restored is None:
      return None, None
    return restored.state, dict(restored.meta)

  def restore_latest(self, abstract_state):
    """``(state, meta)`` of the newest checkpoint that restores, or
    ``(None, None)`` when there is none."""
    return self._restore(self._latest, abstract_state)

  def restore_best(self, abstract_state):
    """``(state, meta)`` of the best checkpoint, or ``(None, None)``."""
    return self._restore(self._best, abstract_state)

  def reached_preemption(self, step: int) -> bool:
    return self._latest.reached_preemption(step)

  def wait_until_finished(self) -> None:
    """Waits for the saves under way (``OSError``: as ``save``)."""
    with self._writing():
      self._latest.wait_until_finished()
      self._best.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves under way and closes (``OSError``: as ``save``);
    after a failed save, nothing is left to close."""
    if self._closed:
      return
    with self._writing():
      self._latest.close()
      self._best.close()
    self._closed = True
