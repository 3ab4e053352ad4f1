"""The project's user-facing error type.

A ``UserError`` is a mistake in what the user gave (a flag, a path, a
config, a dataset that is not prepared); its message says what is wrong and
how to fix it, in one or two lines. The command-line tools print it without
a traceback and exit with status 2 (``brnpa_jax.cli``); any other exception
is an internal error and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in the user's input; the message says how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (also a ``ValueError``)."""


class InputNotFoundError(UserError, FileNotFoundError):
  """A file or folder the user named is missing or holds nothing usable."""


class BadInputError(UserError, ValueError):
  """A file the user named exists but cannot be read (corrupt, truncated or
  in another format than its name says)."""
