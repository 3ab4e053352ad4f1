"""Orbax checkpoints: the latest state (for resuming) and the best one.

Both live in the workdir: ``checkpoints/`` keeps the most recent steps,
``best/`` the state with the highest validation accuracy. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint intact; a rerun resumes from the
newest complete one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _checkpoint_dirs(workdir: str, which: str) -> list[tuple[str, str]]:
  dirs = {"best": os.path.join(workdir, "best"),
          "latest": os.path.join(workdir, "checkpoints")}
  if which == "auto":
    return list(dirs.items())
  if which not in dirs:
    raise ValueError(f"checkpoint must be best, latest or auto, got {which!r}.")
  return [(which, dirs[which])]


def restore_variables(workdir: str, checkpoint: str = "auto"):
  """``(variables, step, which)`` of the best (else latest) checkpoint.

  Only ``params`` and ``batch_stats`` are read (not the optimiser state),
  onto the first local device, whatever mesh the run was trained on.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for which, path in _checkpoint_dirs(os.path.abspath(workdir), checkpoint):
    if not os.path.isdir(path):
      continue
    mgr = ocp.CheckpointManager(
        path, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = mgr.latest_step()
    if step is None:
      mgr.close()
      continue
    tree = mgr.item_metadata(step)["state"].tree
    target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(
        m.shape, m.dtype, sharding=device), tree[k])
              for k in ("params", "batch_stats") if k in tree}
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    mgr.close()
    return dict(restored.state), int(step), which
  raise FileNotFoundError(
      f"no checkpoint ({checkpoint}) in {workdir}/best or {workdir}/checkpoints: "
      "train first (python train.py --config ... --workdir WORKDIR).")


def abstract_like(state_shapes, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target of a state."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      state_shapes, shardings)


class Checkpointer:
  """Latest and best checkpoints of one run.

  Each checkpoint holds the train state and a small JSON ``meta`` dict
  (epoch, best accuracy so far, ...), so a resumed run knows what was best.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    workdir = os.path.abspath(workdir)
    opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
    self._latest = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=opts(max_to_keep),
        item_names=("state", "meta"))
    self._best = ocp.CheckpointManager(
        os.path.join(workdir, "best"), options=opts(1),
        item_names=("state", "meta"))

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
      mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          force=force)

  def _restore(self, mgr, abstract_state):
    step = mgr.latest_step()
    if step is None:
      return None, None
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def restore_latest(self, abstract_state):
    """``(state, meta)`` of the newest checkpoint, or ``(None, None)``."""
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
