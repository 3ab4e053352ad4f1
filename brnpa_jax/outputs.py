"""Writing a tool's outputs so that a failed or interrupted run changes nothing.

Every output is built under a hidden temporary name beside its destination
and renamed into place only once complete:

- one file (``replace_file``): written to ``.<name>.brnpa-tmp-<id>`` in the
  same folder, flushed to disk, then ``os.replace``-d over ``<name>``;
- a folder of outputs (``replace_folder``): the whole set is built in a
  sibling ``.<name>.brnpa-tmp-<id>/``, then swapped in with one atomic
  exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``; a
  rename aside and a rename in elsewhere), and the earlier set is removed.

So an exception, Ctrl-C or SIGTERM leaves the earlier outputs as they were
and no partial set; SIGKILL leaves only the hidden temporary, which the next
run that writes there removes (each temporary is ``flock``-ed by its
writer, so one that a live run still holds is never touched). Two runs
writing one destination do not interleave: the last to finish wins, whole.

A folder of outputs belongs to the tool: it is replaced only while it holds
nothing but the names that tool writes (or nothing), so a user's own files
are never deleted; a folder that holds other files is refused. The
destination is checked, and the temporary created, when the ``with`` block
starts: call these before any expensive work, so that a bad ``--out`` fails
in seconds.

The errors of the file system that these functions meet name the
destination; around a tool's own writing, ``naming`` does the same for
errors without a file name (a failed ``write``: a full disk, a quota) or
wrapped by a library (``os_errno`` finds the number): ``cli.run`` prints
them as one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from typing import Iterable, Iterator

from brnpa_jax.errors import UserError

_TMP = ".brnpa-tmp-"
_ASIDE = ".old"  # an earlier set renamed aside (where no exchange exists)
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_LIBC = ctypes.CDLL(None, use_errno=True)


# Errors of the file system that libraries report in their messages only.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS,
                 errno.EACCES, errno.EPERM, errno.EIO)


class ForeignFilesError(UserError, FileExistsError):
  """The output folder holds files the tool did not write."""


def os_errno(e: BaseException | None) -> int | None:
  """The OS error number behind a failed write, or None.

  An ``OSError`` carries it; libraries that wrap it keep it only in their
  message (tensorstore under orbax: ``... No space left on device
  [os_error_code='28']``; TensorFlow's summary writer under clu), often as
  the cause or context of another exception: the chain is searched.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    text = str(e)
    found = re.search(r"os_error_code=\W*(\d+)", text)
    if found:
      return int(found.group(1))
    for code in _WRITE_ERRNOS:
      if os.strerror(code) in text:
        return code
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
  """An error of the file system in the block, wrapped or without a file
  name (a failed ``write`` has none), becomes an ``OSError`` naming
  ``path``: what the user gave, and what ``cli.run`` prints. Wrap the
  writing only (an error that names no file while reading inputs is not
  about ``path``)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    code = os_errno(e)
    if code is None or (isinstance(e, OSError) and e.filename is not None):
      raise
    raise OSError(code, os.strerror(code), path) from e


def _tmp_prefix(path: str) -> str:
  # The name is cut so that the temporary's stays within NAME_MAX.
  return os.path.join(os.path.dirname(path),
                      "." + os.path.basename(path)[:64] + _TMP)


def _hold(fd: int) -> None:
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _make_parents(path: str) -> str | None:
  """Creates the folders above ``path``; returns the topmost one created."""
  with contextlib.suppress(FileNotFoundError):
    os.lstat(path)  # a name too long fails here, not at the rename
  folder = os.path.dirname(path)
  created, top = None, folder
  while not os.path.lexists(top):
    created, top = top, os.path.dirname(top)
  try:
    os.makedirs(folder, exist_ok=True)
  except FileExistsError:  # a file where the folder should be
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                             folder) from None
  return created


def _remove_created(path: str, created: str | None) -> None:
  """Removes the folders ``_make_parents`` created, if still empty."""
  folder = os.path.dirname(path)
  while created and len(folder) >= len(created):
    try:
      os.rmdir(folder)
    except OSError:
      return
    folder = os.path.dirname(folder)


def remove_stale(path: str) -> list[str]:
  """Removes the temporaries of earlier writes of ``path`` whose writer is
  gone (killed); returns what was removed. An earlier set left renamed aside
  (a kill between the two renames where no exchange exists) is put back
  when ``path`` is missing."""
  prefix = _tmp_prefix(path)
  folder, start = os.path.dirname(prefix), os.path.basename(prefix)
  removed = []
  try:
    names = [n for n in os.listdir(folder or ".") if n.startswith(start)]
  except (FileNotFoundError, NotADirectoryError):
    return removed
  for name in names:
    stale = os.path.join(folder, name)
    try:
      fd = os.open(stale, os.O_RDONLY)
    except FileNotFoundError:
      continue
    try:
      _hold(fd)  # fails while a live writer holds it
    except OSError:
      continue
    finally:
      os.close(fd)
    if name.endswith(_ASIDE) and not os.path.lexists(path):
      os.rename(stale, path)
      continue
    if os.path.isdir(stale) and not os.path.islink(stale):
      shutil.rmtree(stale, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(stale)
    removed.append(stale)
  return removed


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
  """This module's own file operations on ``path``'s temporary: their
  errors name ``path``, what the user gave."""
  try:
    yield
  except OSError as e:
    raise OSError(e.errno, e.strerror, path) from e


@contextlib.contextmanager
def _creating(path: str, created: str | None) -> Iterator[None]:
  """Creating ``path``'s temporary: on failure, the folders made for it
  are removed again."""
  try:
    with _named(path):
      yield
  except BaseException:
    _remove_created(path, created)
    raise


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def replace_file(path: str) -> Iterator[str]:
  """Yields a temporary path to write ``path``'s new content to; on success
  it replaces ``path`` (flushed to disk first), on any failure it is removed.

  Raises:
    IsADirectoryError: ``path`` is a folder.
    OSError: the folder cannot be written (read-only, permissions, full).
  """
  path = os.path.realpath(path)  # a link is followed, not replaced
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
  created = _make_parents(path)
  with _creating(path, created):
    remove_stale(path)
    tmp = _tmp_prefix(path) + secrets.token_hex(4)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    _hold(fd)
    yield tmp
    with _named(path):
      _fsync(tmp)
      os.replace(tmp, path)
      _fsync(os.path.dirname(path))
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    _remove_created(path, created)
    raise
  finally:
    os.close(fd)


def write_text(path: str, text: str) -> None:
  """Replaces ``path`` with ``text`` atomically (see ``replace_file``)."""
  with replace_file(path) as tmp, naming(path), open(tmp, "w") as f:
    f.write(text)


def _foreign(folder: str, owned: frozenset[str]) -> list[str]:
  return sorted(n for n in os.listdir(folder) if n not in owned)


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths atomically; False where the OS or file system cannot."""
  renameat2 = getattr(_LIBC, "renameat2", None)
  if renameat2 is None:
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
               _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(code, os.strerror(code), b)


def _swap_in(staging: str, path: str) -> None:
  """Puts the complete set at ``path``; the earlier set, if any, is removed."""
  try:
    os.rename(staging, path)  # path missing or empty: one atomic rename
    return
  except OSError as e:
    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
      raise
  if _exchange(staging, path):
    shutil.rmtree(staging, ignore_errors=True)  # now the earlier set
    return
  aside = staging + _ASIDE
  os.rename(path, aside)
  try:
    os.rename(staging, path)
  except BaseException:
    os.rename(aside, path)
    raise
  shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def replace_folder(path: str, owned: Iterable[str]) -> Iterator[str]:
  """Yields an empty temporary folder to build ``path``'s outputs in; on
  success it replaces ``path`` as a whole, on any failure it is removed.

  Args:
    path: the output folder (created with its parents if missing).
    owned: the names the tool writes in it; an existing ``path`` holding
      anything else is refused, before and again just before the swap.

  Raises:
    ForeignFilesError: ``path`` holds files the tool did not write.
    NotADirectoryError: ``path`` is a file.
    OSError: the parent folder cannot be written (read-only, permissions).
  """
  path, owned = os.path.realpath(path), frozenset(owned)

  def check():
    if os.path.exists(path) and not os.path.isdir(path):
      raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    foreign = _foreign(path, owned) if os.path.isdir(path) else []
    if foreign:
      shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
      raise ForeignFilesError(
          f"--out {path} holds files this tool did not write ({shown}); the "
          "folder is replaced as a whole, so give a new or empty folder, or "
          "one that holds only this tool's earlier results.")

  check()
  created = _make_parents(path)
  with _creating(path, created):
    remove_stale(path)
    staging = _tmp_prefix(path) + secrets.token_hex(4)
    os.mkdir(staging)
  fd = os.open(staging, os.O_RDONLY)
  try:
    _hold(fd)
    if os.path.isdir(path):  # keep the folder's permissions
      shutil.copymode(path, staging)
    yield staging
    check()
    with _named(path):
      _swap_in(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    _remove_created(path, created)
    raise
  finally:
    os.close(fd)


def moved(paths, staging: str, path: str):
  """``paths`` (a path, or a list or dict of them) written in the temporary
  folder of ``replace_folder``, as they are once it is swapped in at
  ``path``."""
  if isinstance(paths, dict):
    return {k: moved(v, staging, path) for k, v in paths.items()}
  if isinstance(paths, (list, tuple)):
    return [moved(p, staging, path) for p in paths]
  return os.path.join(path, os.path.relpath(paths, staging))
