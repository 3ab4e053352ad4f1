"""What every command-line tool shares: absl flags and one error style.

Each tool defines its flags on a fresh ``absl.flags.FlagValues`` (so tools
can be imported, and run in-process by tests, side by side) and calls
``run``. A user mistake (a bad flag, a ``UserError``: a missing file, an
unprepared dataset, a config that cannot work) prints ``tool: message`` in
one to three lines and exits with status 2; ``--verbose`` (or
``BRNPA_VERBOSE=1``) shows the traceback as well. Any other exception is an
internal error: its traceback is printed and the status is 1.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import flags

from brnpa_jax.errors import UserError

# TensorFlow (the data pipeline) logs its start-up at INFO; a tool's output
# is its progress and results.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

USAGE = 2


def _prog(name: str | None) -> str:
  return name or os.path.basename(sys.argv[0]) or "brnpa_jax"


def _fail(prog: str, message: str, verbose: bool) -> int:
  if verbose:
    traceback.print_exc()
  print(f"{prog}: {message}", file=sys.stderr, flush=True)
  return USAGE


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
        argv: Sequence[str] | None = None, prog: str | None = None) -> int:
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

  Returns:
    The exit status: 0, 2 for a user mistake, 1 for an internal error.
  """
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
  if len(rest) > 1:
    return _fail(prog, f"unexpected arguments {rest[1:]} (flags are "
                 f"--name=value; see {prog} --help)", fv["verbose"].value)
  try:
    status = main(fv)
  except UserError as e:
    return _fail(prog, str(e), fv["verbose"].value)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
  return status if isinstance(status, int) else 0


def define_run_flags(fv: flags.FlagValues) -> None:
  """``--workdir`` and ``--checkpoint``: the flags that name a trained run."""
  flags.DEFINE_string("workdir", None, "A training workdir (config.json and "
                      "checkpoints).", flag_values=fv)
  flags.DEFINE_enum("checkpoint", "auto", ["auto", "best", "latest"],
                    "auto: best, else latest.", flag_values=fv)


def main_exit(define, main, *, doc: str = "", prog: str | None = None) -> None:
  """``sys.exit(run(...))`` for a tool's ``if __name__ == '__main__'``."""
  sys.exit(run(define, main, doc=doc, prog=prog))
