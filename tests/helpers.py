"""Shared by the tests: tiny configs of the real ones, models for weight import."""

import os

import jax
import jax.numpy as jnp
import ml_collections

from brnpa_jax.models import build_model
from configs import default

# A PRNG implementation for tests that need random initialisation but no
# particular values: with rbg keys the initialisers compile in a fraction of
# threefry's time. Use it where nothing is compared with a threefry run.
FAST_PRNG = "rbg"


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


def weights_model(arch, res="low", num_classes=1000, head="gap"):
  """A ``Classifier`` of backbone ``arch`` as the weight-import tests load it."""
  cfg = ml_collections.ConfigDict(dict(
      backbone=arch, head=head, res=res, num_maps=3, refine=True, init="norm",
      aux_heads=False, dropout=0.0, use_bias=True))
  return build_model(cfg, num_classes)


def abstract_variables(model, size=64):
  """The shapes of ``model``'s variables on ``size`` x ``size`` images."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, size, size, 3))))


def xla_flags(devices: int) -> str:
  """This session's ``XLA_FLAGS`` (conftest's) with ``devices`` fake CPU
  devices, for a subprocess: it compiles as the tests do."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
