"""Shared by the tests: tiny configs of the real ones."""

from configs import default


def tiny_config(data_dir, arg="runlocal", **overrides):
  """``configs/default.py:<arg>`` on one device with data in ``data_dir``.

  ``overrides`` set dotted fields, e.g. ``**{"optim.lr": 0.1}``.
  """
  c = default.get_config(arg)
  c.unlock()
  c.data.data_dir = str(data_dir)
  c.mesh.num_devices = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c
