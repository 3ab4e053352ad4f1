"""Orbax checkpoints of a run: the newest states (for resuming) and the best.

Both live in the workdir: ``checkpoints/`` keeps the most recent steps,
``best/`` the state with the highest validation score. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint intact. A checkpoint damaged later
(a truncated file, a disk error) is reported and the next older one is
used; the damaged one is moved to ``damaged_checkpoints/`` in the workdir,
not deleted. Only when no checkpoint restores is it an error.

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
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from brnpa_jax.runs.workdir import DAMAGED_DIR, RunError, Workdir

_log = logging.getLogger(__name__)
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
    opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
    latest_opts = opts(max_to_keep)
    self._fault, self._writing = _fault_step(), None
    if self._fault is not None:
      latest_opts.async_options = ocp.AsyncOptions(
          post_finalization_callback=self._die_at_fault)
    self._latest = ocp.CheckpointManager(
        self._workdir.checkpoints_dir, options=latest_opts,
        item_names=("state", "meta"))
    self._best = ocp.CheckpointManager(
        self._workdir.best_dir, options=opts(1), item_names=("state", "meta"))

  @property
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  @property
  def best_step(self) -> int | None:
    return self._best.latest_step()

  def save(self, step: int, state, meta: dict[str, Any], *, best: bool = False,
           force: bool = False) -> None:
    """Saves asynchronously; ``best`` also replaces the best checkpoint."""
    managers = [self._latest] + ([self._best] if best else [])
    for i, mgr in enumerate(managers):
      if mgr.latest_step() == step:
        continue  # already saved at this step (e.g. preemption after an epoch)
      if i > 0:
        # Orbax names its multi-host commit barriers by step alone, so two
        # managers committing the same step at once collide ("barrier already
        # ongoing"): let the first finish before the second starts.
        managers[i - 1].wait_until_finished()
      if self._fault is not None and mgr is self._latest:
        mgr.wait_until_finished()  # the previous step's write has ended
        self._writing = step
      mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          force=force)

  def _die_at_fault(self) -> None:
    """Orbax's callback between writing a checkpoint and renaming it."""
    if self._writing == self._fault:
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
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
