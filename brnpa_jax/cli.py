"""What every command-line tool shares: absl flags and one error style.

Each tool defines its flags on a fresh ``absl.flags.FlagValues`` (so tools
can be imported, and run in-process by tests, side by side) and calls
``run``. A user mistake (a bad flag, a ``UserError``: a missing file, an
unprepared dataset, a config that cannot work) prints ``tool: message`` in
one to three lines and exits with status 2; ``--verbose`` (or
``BRNPA_VERBOSE=1``) shows the traceback as well. So does an error of the
operating system about a path (``OSError``: no space left, a read-only file
system, no permission, a missing file, a folder where a file was expected
and the reverse, a name too long): one line naming the path and the fix,
status 2 (``os_error_message``). Any other exception is an internal error:
its traceback is printed and the status is 1. Ctrl-C ends a tool with
status 130 and SIGTERM with 143, both through the normal clean-up (its
outputs are left as they were, ``brnpa_jax.outputs``).

Before the tool's body runs, jax's backends are started without the
native libraries' start-up lines (``brnpa_jax.quiet``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import traceback
from typing import Any, Callable, Iterator, Sequence

from absl import flags

from brnpa_jax import quiet
from brnpa_jax.errors import UserError

USAGE = 2
INTERRUPTED, TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM

# What each error of the operating system means for the path it names, and
# the fix.
_AGAIN = "then run the same command again"
OS_ERRORS = {
    errno.ENOSPC: f"no space left on the device: free some space, {_AGAIN}",
    errno.EDQUOT: f"disk quota exceeded: free some space, {_AGAIN}",
    errno.EFBIG: ("file too large for the file system or for this process's "
                  f"file-size limit (ulimit -f): raise the limit, {_AGAIN}"),
    errno.EROFS: "read-only file system: choose a writable location",
    errno.EACCES: "permission denied: change its permissions or choose "
                  "another location",
    errno.EPERM: "operation not permitted: change its permissions or choose "
                 "another location",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EISDIR: "is a folder: name a file",
    errno.ENOTDIR: "not a folder (a file is in the way): check the path",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
}


def _prog(name: str | None) -> str:
  return name or os.path.basename(sys.argv[0]) or "brnpa_jax"


def _fail(prog: str, message: str, verbose: bool) -> int:
  if verbose:
    traceback.print_exc()
  print(f"{prog}: {message}", file=sys.stderr, flush=True)
  return USAGE


# Control characters of a path as escapes: a newline in a name would break
# the one line.
_CONTROL = {**{c: f"\\x{c:02x}" for c in (*range(32), 127)},
            ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


# The errors about a path that code raises with its own message.
_MISSING_PATH = (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                 FileExistsError)


def os_error_message(e: OSError) -> str | None:
  """The line for an ``OSError`` the user can fix (``OS_ERRORS``, or any
  error that names a path); None for one that is internal."""
  path = e.filename
  if isinstance(path, bytes):
    path = os.fsdecode(path)
  if isinstance(path, str):
    path = path.translate(_CONTROL)
  if e.errno in OS_ERRORS:
    what = OS_ERRORS[e.errno]
    return f"{path}: {what}." if path else f"{what[0].upper()}{what[1:]}."
  if path and e.errno is not None:
    return f"{path}: {e.strerror or os.strerror(e.errno)}."
  if (e.errno is None and isinstance(e, _MISSING_PATH) and len(e.args) == 1
      and isinstance(e.args[0], str) and e.args[0].strip()):
    # Raised with a message of its own (``FileNotFoundError("no checkpoint
    # in DIR: train first ...")``): a path that is not what the tool needs.
    return e.args[0].strip()
  return None


@contextlib.contextmanager
def _any_path_printable() -> Iterator[None]:
  """Standard output writes a string that cannot be encoded (a path of
  non-UTF-8 bytes, held as surrogate escapes) with ``\\xNN`` escapes
  instead of failing after the tool's work is done: under a UTF-8 locale
  Python's stdout is strict (stderr already escapes)."""
  stream = sys.stdout
  errors = getattr(stream, "errors", None)
  if errors != "strict" or not hasattr(stream, "reconfigure"):
    yield
    return
  stream.reconfigure(errors="backslashreplace")
  try:
    yield
  finally:
    with contextlib.suppress(Exception):  # a stream closed meanwhile
      stream.reconfigure(errors=errors)


class _Terminated(BaseException):
  """SIGTERM, raised so that clean-up (``finally``) runs."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
  def handle(signum, frame):
    del signum, frame
    raise _Terminated()

  try:
    old = signal.signal(signal.SIGTERM, handle)
  except ValueError:  # not the main thread: signals are not ours to handle
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


def _flag_message(e: Exception, args: Sequence[str]) -> str:
  """The line a user needs from a flag-parsing error."""
  text = str(e).strip()
  if isinstance(e, (KeyError, AttributeError)):
    # An override of a field the config lacks: --config.optim.lrr=1.
    name = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    name = name.group(0) if name else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    arg = next((a.split("=")[0] for a in args
                if a.startswith("--") and re.search(rf"\.{name}(=|$)", a)), None)
    return (f"{arg or name}: the config has no field {name!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
            + "; see the config file for its fields.")
  return text.splitlines()[0] if text else type(e).__name__


def run(define: Callable[[flags.FlagValues, list[str]], None],
        main: Callable[[flags.FlagValues], Any], *, doc: str = "",
        argv: Sequence[str] | None = None, prog: str | None = None,
        start_jax: bool = True) -> int:
  """Parses ``argv`` into the flags ``define`` declares, then calls ``main``.

  Args:
    define: ``define(fv, argv)`` declares the tool's flags on ``fv``
      (``flags.DEFINE_string(..., flag_values=fv)``;
      ``config_file.define_config_flag(fv, argv, ...)`` so that
      ``--config.field=value`` overrides are read from ``argv`` and the
      config is validated before ``main`` runs).
    main: the tool's body, given the parsed flags; its return value is
      ignored unless it is an int (the exit status).
    doc: shown by ``--help`` above the flags.
    argv: the arguments after the program name (default ``sys.argv[1:]``).
    prog: the program name in messages.
    start_jax: start jax's backends before ``main`` (``quiet.start_jax``);
      False for a tool without jax, or one that must call
      ``jax.distributed.initialize`` first (it then calls ``start_jax``).

  Returns:
    The exit status: 0, 2 for a user mistake or an ``OSError`` about a path,
    1 for an internal error, 130 after Ctrl-C, 143 after SIGTERM.
  """
  with _any_path_printable():
    return _run(define, main, doc=doc, argv=argv, prog=prog,
                start_jax=start_jax)


def _run(define, main, *, doc, argv, prog, start_jax) -> int:
  prog = _prog(prog)
  args = list(sys.argv[1:] if argv is None else argv)
  verbose = os.environ.get("BRNPA_VERBOSE", "") not in ("", "0")
  fv = flags.FlagValues()
  flags.DEFINE_bool("verbose", verbose, "Show tracebacks of user errors too.",
                    flag_values=fv)
  flags.DEFINE_bool("help", False, "Show this help.", flag_values=fv,
                    short_name="?")
  define(fv, [prog] + args)
  if "--help" in args or "-?" in args:
    print(doc.rstrip() + "\n\nFlags:\n" + fv.get_help(include_special_flags=False))
    return 0
  try:
    rest = fv([prog] + args)
  except UserError as e:
    # A config file that gives no config, or a config value out of range
    # (brnpa_jax.config_file loads and validates --config while parsing).
    return _fail(prog, str(e), verbose or "--verbose" in args)
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    # Flag parsing, including an unknown --config.field: the user's.
    return _fail(prog, _flag_message(e, args) + f"\n(see {prog} --help)",
                 verbose or "--verbose" in args)
  except KeyboardInterrupt:  # Ctrl-C while a config file loads
    print(f"{prog}: interrupted", file=sys.stderr)
    return INTERRUPTED
  if len(rest) > 1:
    return _fail(prog, f"unexpected arguments {rest[1:]} (flags are "
                 f"--name=value; see {prog} --help)", fv["verbose"].value)
  try:
    with _sigterm_raises():
      if start_jax:
        quiet.start_jax()
      status = main(fv)
  except UserError as e:
    return _fail(prog, str(e), fv["verbose"].value)
  except OSError as e:
    message = os_error_message(e)
    if message is None:
      raise
    return _fail(prog, message, fv["verbose"].value)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return INTERRUPTED
  except _Terminated:
    print(f"{prog}: terminated", file=sys.stderr)
    return TERMINATED
  return status if isinstance(status, int) else 0


def define_run_flags(fv: flags.FlagValues) -> None:
  """``--workdir`` and ``--checkpoint``: the flags that name a trained run."""
  flags.DEFINE_string("workdir", None, "A training workdir (config.json and "
                      "checkpoints).", flag_values=fv)
  flags.DEFINE_enum("checkpoint", "auto", ["auto", "best", "latest"],
                    "auto: best, else latest.", flag_values=fv)


def define_multiprocess_flags(fv: flags.FlagValues) -> None:
  """``--multiprocess`` and its arguments, for ``start_jax``."""
  flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize() "
                    "first (arguments auto-detected on TPU pods, SLURM and Open "
                    "MPI unless given below).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, "
                      "with --multiprocess.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "With --multiprocess.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("process_id", None, "With --multiprocess.",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout_seconds", 100, "With --multiprocess: "
                       "a process that stops answering for this long ends the "
                       "run on every host, with an error.", lower_bound=1,
                       flag_values=fv)


def start_jax(fv: flags.FlagValues) -> None:
  """``jax.distributed.initialize`` under ``--multiprocess``
  (``define_multiprocess_flags``), then ``quiet.start_jax``: for a tool
  that ``run`` calls with ``start_jax=False``."""
  if fv.multiprocess:
    import jax  # pylint: disable=g-import-not-at-top  # after flag parsing
    jax.distributed.initialize(
        coordinator_address=fv.coordinator_address,
        num_processes=fv.num_processes, process_id=fv.process_id,
        heartbeat_timeout_seconds=fv.heartbeat_timeout_seconds)
  quiet.start_jax()


def main_exit(define, main, *, doc: str = "", prog: str | None = None) -> None:
  """``sys.exit(run(...))`` for a tool's ``if __name__ == '__main__'``."""
  sys.exit(run(define, main, doc=doc, prog=prog))
