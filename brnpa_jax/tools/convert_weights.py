r"""Converts a torchvision / timm checkpoint into a file our configs load.

  python -m brnpa_jax.tools.convert_weights --weights resnet50-11ad3fa6.pth --out resnet50.npz
  python -m brnpa_jax.tools.convert_weights --weights model.safetensors --out convnext_tiny.npz

``--weights`` is ``.pth`` / ``.pt`` / ``.bin`` (no PyTorch needed but for its
legacy pre-1.6 format), ``.safetensors`` or
``.npz``: a ResNet in torchvision's key layout (timm's ResNets share it), or
timm's ``convnext_*``, ``vit_*`` or ``deit_*`` (non-distilled) layout.
``--out`` is a ``.npz`` of our variable tree (``params/backbone/conv1/kernel``, ...,
``batch_stats/...``, ``params/classifier/...``), float32, kernels already in
Flax's layout: numpy reads it with no PyTorch or safetensors installed, and
its names are ours, so loading it is a lookup. The tool recognises the
architecture (one of ``BACKBONES``) and checks the weights load strictly into
it before writing; ``config.init_from`` set to that file then starts a run from them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from flax import traverse_util

from brnpa_jax import cli
from brnpa_jax.errors import InputNotFoundError, UserError
from brnpa_jax.models import timm_names, weights
from brnpa_jax.models.classifier import Classifier
from brnpa_jax.models.convnext import ConvNeXt
from brnpa_jax.models.heads import GAPHead
from brnpa_jax.models.registry import BACKBONES, family
from brnpa_jax.models.vit import VisionTransformer

TIMM_FAMILIES = {timm_names.CONVNEXT: ConvNeXt, timm_names.VIT: VisionTransformer}


def _structure(arch: str):
  """(block expansion, stage sizes, width) of a torchvision-layout ResNet;
  None for the backbones of other layouts (ResNet-12)."""
  kw = getattr(BACKBONES[arch], "keywords", None)
  if not kw or "block" not in kw:
    return None
  return kw["block"].expansion, tuple(kw["stage_sizes"]), kw.get("width", 64)


def _pretrained_shapes(arch: str) -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of what a checkpoint supplies to ``arch`` (its
  backbone and ``head_norm``), from the model's abstract variables."""
  model = Classifier(backbone=BACKBONES[arch](), head=GAPHead(), num_classes=1)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 64, 64, 3))))
  flat = traverse_util.flatten_dict(abstract, sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()
          if weights.top_module(k) in weights.PRETRAINED}


def infer_arch(flat) -> str:
  """The ``BACKBONES`` name whose layout a flat checkpoint has (the first
  one, for presets of one layout such as ``vit_small_patch16_224`` and
  ``deit_small_patch16_224``)."""
  timm_family = timm_names.flat_family(flat)
  if timm_family is None:
    found = weights.layout(flat)
    fits = lambda arch: _structure(arch) == found
  else:
    shapes = {k: tuple(v.shape) for k, v in flat.items()
              if weights.top_module(k) in weights.PRETRAINED}
    fits = lambda arch: (family(arch) is TIMM_FAMILIES[timm_family]
                         and _pretrained_shapes(arch) == shapes)
  arch = next(filter(fits, BACKBONES), None)
  if arch is not None:
    return arch
  raise ValueError(f"No backbone in {sorted(BACKBONES)} has the checkpoint's "
                   f"layout ({weights.describe(flat)}). ResNets in "
                   "torchvision's layout (timm's plain resnetNN; not variants "
                   "such as resnet50d's deep stem) and timm's convnext_*, "
                   "vit_* and deit_* of the registered sizes convert.")


def check(flat) -> str:
  """Strict-loads ``flat`` into the model it describes; returns a summary."""
  arch = infer_arch(flat)
  fc = flat.get(weights.CLASSIFIER + "kernel")
  model = Classifier(backbone=BACKBONES[arch](), head=GAPHead(),
                     num_classes=1 if fc is None else fc.shape[-1])
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 64, 64, 3))))
  weights.load_pretrained(abstract, flat, skip_classifier=fc is None)
  return f"{arch}: {weights.describe(flat)}"


def convert(src: str, dst: str) -> str:
  """Reads ``src``, checks it, writes ``dst`` (.npz); returns a summary."""
  if not dst.endswith(".npz"):
    raise ValueError(f"OUT must end in .npz (got {dst!r}).")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError("IN and OUT are the same file.")
  flat = weights.read_checkpoint(src)
  summary = check(flat)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  np.savez(dst, **flat)
  return summary


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("weights", None, "The checkpoint to convert: .pth/.pt/.bin, "
                      ".safetensors or .npz.", flag_values=fv)
  flags.DEFINE_string("out", None, "The .npz to write.", flag_values=fv)
  flags.mark_flags_as_required(["weights", "out"], flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  if not os.path.isfile(fv.weights):
    raise InputNotFoundError(f"--weights={fv.weights}: no such file.")
  if os.path.isdir(fv.out):
    raise UserError(f"--out={fv.out} is a folder; give the .npz file to write.")
  try:
    summary = convert(fv.weights, fv.out)
  except (ValueError, ImportError) as e:
    raise UserError(str(e)) from e
  print(f"Wrote {fv.out} ({summary}).")


def main(argv=None) -> int:
  """Command line: ``python -m brnpa_jax.tools.convert_weights --weights IN --out OUT``."""
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.convert_weights")


if __name__ == "__main__":
  raise SystemExit(main())
