"""Parsing of the config arg strings: ``"head=bcnn,res=low,k=5,runlocal"``.

Every config file's ``get_config(arg)`` takes such a string. Keys must be
among the config's declared switches (an unknown key is an error naming the
valid ones); values are converted to the type of the switch's default, and a
bare key means ``True``. The result records which switches were given
(``Switches.given``), so that a preset such as ``runlocal`` changes only
what the user left to it.
"""

from __future__ import annotations

from typing import Any, Mapping

from brnpa_jax.errors import ConfigError


class Switches(dict):
  """Switch name -> value, and ``given``: the names set in the arg string."""

  def __init__(self, values: Mapping[str, Any], given=()):
    super().__init__(values)
    self.given = frozenset(given)


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"config arg {key}={value!r}: expected true or false.")
  try:
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    kind = "an integer" if isinstance(default, int) else "a number"
    raise ConfigError(f"config arg {key}={value!r}: expected {kind}.") from None
  return value


def parse_arg(arg: str | None, switches: Mapping[str, Any],
              choices: Mapping[str, tuple] | None = None) -> Switches:
  """Parses ``"key=value,flag"`` against declared switches and their defaults.

  Args:
    arg: the string after the colon in ``--config=configs/x.py:ARG``.
    switches: switch name -> default value (its type sets the value's type).
    choices: optional switch name -> allowed values.

  Returns:
    The switches with the given values applied; ``.given`` names those the
    string set.

  Raises:
    ConfigError: an unknown switch, or a value of the wrong type or not
      among its choices.
  """
  out, given = dict(switches), set()
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in switches:
      raise ConfigError(f"Unknown config arg {key!r}; valid: {sorted(switches)}.")
    out[key] = _convert(key, value.strip(), switches[key]) if sep else True
    given.add(key)
    allowed = (choices or {}).get(key)
    if allowed is not None and out[key] not in allowed:
      raise ConfigError(f"config arg {key}={out[key]!r}: valid values are "
                        f"{list(allowed)}.")
  return Switches(out, given)
