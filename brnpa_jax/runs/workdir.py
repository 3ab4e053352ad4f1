"""The workdir's layout, its config guard and its summary."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Iterator, Mapping

import ml_collections

from brnpa_jax import outputs
from brnpa_jax.data.image_files import MAX_PIXELS
from brnpa_jax.errors import UserError

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
SUMMARY_FILE = "summary.json"
CLASS_NAMES_FILE = "class_names.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
DAMAGED_DIR = "damaged_checkpoints"

# Fields a run may be resumed with other values of: they change when and
# where things happen, not what is trained.
RESUME_SAFE_FIELDS = (
    "log_every_steps",         # how often training metrics are written
    "checkpoint_every_steps",  # how often the newest state is saved
    "max_to_keep",             # how many newest states are kept
    "num_overlays",            # images in the final picture
    "eval_batch_size",         # evaluation sums are the same for any batch
    "mesh.num_devices",        # a resumed run may move to another slice...
    "mesh.fsdp",               # ...or layout: the state is resharded
    "data.data_dir",           # where the (same) prepared data is found
)
# Fields added to the configs after runs were trained without them, with the
# value that does what the code did before they existed: a stored config
# that lacks one was trained under that value, so it resumes (and a finished
# run prints its summary) under a config that has it.
ADDED_FIELDS = {
    "model.patch_size": 0,         # 0: the backbone's own patch / stem
    "model.img_size": 0,           # 0: a ViT's own position-embedding grid
    "model.drop_path_rate": 0.0,   # no stochastic depth
    "model.stem": "patch",         # the family's own stem
    "data.folder.max_pixels": MAX_PIXELS,  # the pixel limit then in force
}
_ABSENT = "<absent>"


class RunError(UserError, ValueError):
  """A workdir cannot be used as asked; the message says how to proceed."""


class ConfigMismatchError(RunError):
  """The requested config differs from the run's ``config.json``.

  Attributes:
    differences: ``(field, stored, requested)`` per differing field.
  """

  def __init__(self, workdir: str, differences, *, finished: bool):
    self.differences = list(differences)
    lines = [f"  {f}: stored {_show(a)}, requested {_show(b)}"
             for f, a, b in self.differences]
    n = len(self.differences)
    what = (f"{workdir} is a finished run whose config.json differs from the "
            f"requested config in {n} field{'s' * (n > 1)}:" if finished else
            f"{workdir} holds a run whose config.json differs from the "
            f"requested config in {n} field{'s' * (n > 1)}:")
    how = ("A finished run is never changed: start the new config in a new "
           "--workdir." if finished else
           "Start the new config in a new --workdir, or resume this run under "
           "it with --allow_config_change (recorded in "
           f"{CONFIG_HISTORY_FILE}).")
    super().__init__("\n".join([what, *lines, how]))


def _show(value) -> str:
  return value if value is _ABSENT else json.dumps(value)


def config_dict(config) -> dict[str, Any]:
  """A config as plain JSON types (tuples become lists), as stored."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config)))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(stored: Mapping[str, Any], requested: Mapping[str, Any],
                       ignore=RESUME_SAFE_FIELDS) -> list[tuple[str, Any, Any]]:
  """``(field, stored, requested)`` for each dotted field that differs."""
  a, b = _flatten(config_dict(stored)), _flatten(config_dict(requested))
  a.update({k: v for k, v in ADDED_FIELDS.items() if k not in a and k in b})
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT))
          for k in sorted(a.keys() | b.keys())
          if k not in ignore and a.get(k, _ABSENT) != b.get(k, _ABSENT)]


@dataclasses.dataclass(frozen=True)
class Workdir:
  """A run's directory (see the package docstring for its layout)."""
  path: str

  def __post_init__(self):
    object.__setattr__(self, "path",
                       os.path.abspath(os.path.expanduser(str(self.path))))

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def config_file(self) -> str:
    return self.file(CONFIG_FILE)

  @property
  def summary_file(self) -> str:
    return self.file(SUMMARY_FILE)

  @property
  def metrics_file(self) -> str:
    return self.file(METRICS_FILE)

  @property
  def checkpoints_dir(self) -> str:
    return self.file("checkpoints")

  @property
  def best_dir(self) -> str:
    return self.file("best")

  @property
  def overlays_dir(self) -> str:
    return self.file("overlays")

  # -- state of the run ----------------------------------------------------------
  def has_config(self) -> bool:
    return os.path.isfile(self.config_file)

  def is_finished(self) -> bool:
    return os.path.isfile(self.summary_file)

  def has_checkpoints(self) -> bool:
    """True once the run has saved a state (in ``checkpoints/``, ``best/``
    or, set aside, ``damaged_checkpoints/``): training happened under its
    config."""
    steps = lambda d: os.path.isdir(d) and any(
        n.isdigit() for n in os.listdir(d))
    return (steps(self.checkpoints_dir) or steps(self.best_dir)
            or os.path.isdir(self.file(DAMAGED_DIR)))

  def check_is_directory(self) -> None:
    """Raises RunError when the path exists but is not a directory."""
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise RunError(f"--workdir {self.path} is a file, not a directory: "
                     "pass a directory (it is created if missing).")

  # -- the lock ------------------------------------------------------------------
  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Holds the workdir for one training process (process 0 of a run).

    An OS file lock (``flock``) on ``.lock``: the kernel releases it when the
    holder exits or dies, so a crashed or killed run never leaves a stale
    lock behind. The file records the holder (host, pid, start, command) for
    the message a second process gets.

    Raises:
      RunError: another live process holds the workdir.
    """
    os.makedirs(self.path, exist_ok=True)
    path = self.file(LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise  # e.g. a filesystem without locks: say so, do not guess
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        raise RunError(f"{self.path} is in use by another training process "
                       f"({holder or 'holder unknown'}); wait for it to "
                       "finish or stop it, or use another --workdir.") from None
      record = (f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)[:200]}")
      os.ftruncate(fd, 0)
      os.pwrite(fd, record.encode(), 0)
      yield
    finally:
      os.close(fd)  # releases the lock

  # -- config --------------------------------------------------------------------
  def read_config(self) -> ml_collections.ConfigDict:
    """The config the run was started with."""
    if not os.path.isdir(self.path):
      raise RunError(f"--workdir {self.path} does not exist: pass the workdir "
                     "of a run that train.py has started.")
    if not self.has_config():
      raise RunError(f"{self.path} is not a training workdir (it has no "
                     f"{CONFIG_FILE}): pass the --workdir of a run that "
                     "train.py has started.")
    return ml_collections.ConfigDict(self._stored_config())

  def _stored_config(self) -> dict[str, Any]:
    config = self._read_json(CONFIG_FILE)
    if not isinstance(config, dict):
      raise RunError(f"{self.config_file} is damaged (it holds a "
                     f"{type(config).__name__}, not a config): restore it, or "
                     "train again in a new workdir.")
    return config

  def _read_json(self, name: str) -> Any:
    """A JSON file of the run; one that does not parse is a ``RunError``."""
    path = self.file(name)
    try:
      with open(path, "rb") as f:
        return json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is one
      raise RunError(f"{path} is damaged ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}): restore it, "
                     "or train again in a new workdir.") from e

  def check_config(self, config, *, allow_change: bool = False
                   ) -> list[tuple[str, Any, Any]]:
    """Compares ``config`` with the stored one, if any.

    Fields in ``RESUME_SAFE_FIELDS`` may differ. Returns the other
    differences when they are accepted: a run that has saved no checkpoint
    holds no training under its config, so a new config replaces it (a
    start that failed never blocks the corrected command); an unfinished
    run with checkpoints takes one only with ``allow_change``.

    Raises:
      ConfigMismatchError: fields differ and the change is not allowed, or
        the run is finished.
    """
    if not self.has_config():
      return []
    stored = self._stored_config()
    differences = config_differences(stored, config)
    finished = self.is_finished()
    if differences and (finished or (self.has_checkpoints()
                                     and not allow_change)):
      raise ConfigMismatchError(self.path, differences, finished=finished)
    return differences

  def write_config(self, config, changes=()) -> None:
    """Writes ``config.json`` when the run starts, or when ``changes`` (from
    ``check_config``) were accepted: the old config and the changes are then
    appended to ``config_history.jsonl``."""
    if self.has_config() and not changes:
      return
    os.makedirs(self.path, exist_ok=True)
    if changes:
      previous = self._stored_config()
      record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "changes": [{"field": f, "stored": a, "requested": b}
                            for f, a, b in changes],
                "previous_config": previous}
      with open(self.file(CONFIG_HISTORY_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")
    outputs.write_text(self.config_file, json.dumps(config_dict(config), indent=2))

  # -- class names ---------------------------------------------------------------
  def write_class_names(self, names) -> None:
    """The dataset's class names in label order, written when the run starts
    (what predictions and exported models name their classes by)."""
    if names is not None and not os.path.isfile(self.file(CLASS_NAMES_FILE)):
      os.makedirs(self.path, exist_ok=True)
      outputs.write_text(self.file(CLASS_NAMES_FILE), json.dumps(list(names)))

  def read_class_names(self) -> list[str] | None:
    """The class names, or None when the run has none (index them)."""
    path = self.file(CLASS_NAMES_FILE)
    if not os.path.isfile(path):
      return None
    names = self._read_json(CLASS_NAMES_FILE)
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
      raise RunError(f"{path} is damaged (not a list of class names): restore "
                     "it, or delete it to name classes by their index.")
    return names

  # -- summary -------------------------------------------------------------------
  def read_summary(self) -> dict[str, Any] | None:
    if not self.is_finished():
      return None
    return self._read_json(os.path.basename(self.summary_file))

  def write_summary(self, summary: Mapping[str, Any]) -> None:
    outputs.write_text(self.summary_file, json.dumps(dict(summary), indent=2))
