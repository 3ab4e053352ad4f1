"""The ``--config`` flag of every tool: one loader, then the validation pass.

``define_config_flag(fv, argv)`` declares ``--config FILE[:ARG]`` as
ml_collections' config flag does (``get_config(ARG)`` of the file, fields
overridden with ``--config.<field>=<value>``), with two differences:

- the file is loaded when the flag is parsed, and a file that cannot give a
  config (missing, a syntax error, an exception raised in the file or in its
  ``get_config``, no ``get_config``, a result that is not a ConfigDict) is a
  ``ConfigFileError`` naming the file, and the line where the file has one,
  instead of a deferred error and a traceback later;
- once every override is applied, the config goes through
  ``config_check.validate``, so a tool's ``main`` never sees a config that
  cannot work, and nothing is written under one.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from typing import Mapping

import ml_collections
from absl import flags
from ml_collections import config_flags

from brnpa_jax.config_check import validate
from brnpa_jax.errors import UserError


class ConfigFileError(UserError):
  """A config file that gives no config; the message names the file."""


def _line_in(path: str, e: BaseException) -> str:
  """``path, line N``: the last line of ``path`` the error passed through."""
  target = os.path.abspath(path)
  line = (e.lineno if isinstance(e, SyntaxError)
          and os.path.abspath(e.filename or "") == target else None)
  for frame in traceback.extract_tb(e.__traceback__):
    if os.path.abspath(frame.filename) == target:
      line = frame.lineno
  return f"{path}, line {line}" if line else path


def _describe(e: BaseException) -> str:
  if isinstance(e, SyntaxError):
    return f"{type(e).__name__}: {e.msg}"
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_config(spec: str, *, module_name: str = "config_config",
                lock: bool = True) -> ml_collections.ConfigDict:
  """The config of ``FILE[:ARG]``: ``get_config(ARG)`` of the Python file.

  Args:
    spec: the file, optionally with the arg string after the first colon.
    module_name: the name the file is loaded under (``sys.modules``).
    lock: lock the config against new fields (typos).

  Returns:
    A ConfigDict (a mapping that ``get_config`` returns is converted).

  Raises:
    ConfigFileError: the file cannot give a config; the message names the
      file and, for a syntax error or an exception raised in the file, the
      line.
  """
  path, has_arg, arg = spec.partition(":")
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "no such file"
    raise ConfigFileError(f"--config {path}: {what}; give a config file, e.g. "
                          "configs/default.py (switches after a colon).")
  try:
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # as ml_collections' loader does
    module_spec.loader.exec_module(module)
  # The file's own error; a sys.exit() in it too (it would end the tool
  # with the file's status and no message).
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    raise ConfigFileError(f"{_line_in(path, e)}: {_describe(e)}") from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigFileError(f"{path} defines no get_config(): a config file "
                          "returns its ml_collections.ConfigDict from "
                          "get_config(arg).")
  try:
    config = get_config(arg) if has_arg else get_config()
  except UserError as e:  # a bad switch: the recipe's own message
    raise ConfigFileError(f"--config {spec}: {e}") from e
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    raise ConfigFileError(f"{_line_in(path, e)}: {_describe(e)}") from e
  if isinstance(config, Mapping) and not isinstance(
      config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  if not isinstance(config, ml_collections.ConfigDict):
    got = "None" if config is None else f"a {type(config).__name__}"
    raise ConfigFileError(f"{path}: get_config() returned {got}, not an "
                          "ml_collections.ConfigDict (or a dict).")
  if lock:
    config.lock()
  return config


_SECTIONS = (Mapping, ml_collections.ConfigDict)


class OverridePathError(UserError):
  """``--config.a.b=v`` where ``a`` is a value, not a section."""


def check_override_paths(config, argv, name: str = "config") -> None:
  """Every ``--<name>.a.b=value`` in ``argv`` must reach ``b`` through
  sections: one that walks into a value (``--config.model.backbone.x``,
  where ``backbone`` is a string) is an ``OverridePathError``
  (ml_collections would fail with a ``TypeError``). A missing field is left to ml_collections'
  message (``cli`` turns it into one line)."""
  prefix = f"--{name}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    parts = arg[len(prefix):].split("=", 1)[0].split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
      if not isinstance(node, _SECTIONS):
        section = ".".join(parts[:i])
        raise OverridePathError(
            f"{prefix}{'.'.join(parts)}: {section} is {node!r}, not a section "
            f"of fields; set it with {prefix}{section}=VALUE.")
      if part not in node:
        break
      node = node[part]
    else:
      if len(parts) > 1 and not isinstance(node, _SECTIONS):
        section = ".".join(parts[:-1])
        raise OverridePathError(
            f"{prefix}{'.'.join(parts)}: {section} is {node!r}, not a section "
            f"of fields; set it with {prefix}{section}=VALUE.")


class _Parser(flags.ArgumentParser):
  """Parses the ``--config`` value through ``load_config``, then checks the
  overrides' paths."""

  def __init__(self, name: str, argv=()):
    self.name, self.argv = name, list(argv)

  def parse(self, argument):
    config = load_config(argument, module_name=f"{self.name}_config")
    check_override_paths(config, self.argv, self.name)
    return config

  def flag_type(self):
    return "config object"


def define_config_flag(fv: flags.FlagValues, argv, help_string: str,
                       name: str = "config") -> flags.FlagHolder:
  """Declares ``--config`` on ``fv`` for a tool run by ``cli.run``.

  Args:
    fv: the tool's flags.
    argv: the program name and arguments (where the ``--config.<field>``
      overrides are read from).
    help_string: the flag's help.
    name: the flag's name.

  Returns:
    The flag's holder.
  """
  holder = config_flags.DEFINE_config_file(
      name, None, help_string, flag_values=fv, lock_config=True,
      sys_argv=list(argv))
  fv[name].parser = _Parser(name, argv)  # the overrides stay ml_collections'
  # Validators run once every flag, overrides included, is parsed.
  flags.register_validator(
      name, lambda config: config is None or validate(config, f"--{name}") or True,
      flag_values=fv)
  return holder
