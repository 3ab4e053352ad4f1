"""timm's key layout of ConvNeXt and ViT / DeiT: our flat names <-> timm keys.

Our module names are timm's with each numbered child written ``name_i``
(``stages.1.blocks.0.conv_dw`` -> ``stages_1/blocks_0/conv_dw``). A leaf
``weight`` becomes ``kernel`` (convolutions OIHW -> HWIO, linear layers
(out, in) -> (in, out), in ``weights.to_flax_layout``) or, on a LayerNorm,
``scale``; ``bias``, ``gamma``, ``cls_token`` and ``pos_embed`` keep their
name and layout. The classifier, ``head.fc`` (ConvNeXt) or ``head`` (ViT),
is ``params/classifier``; ConvNeXt's ``head.norm`` is ``params/head_norm``.
Keys outside these architectures (a distillation token, register tokens,
``fc_norm``) have no name here, so the strict loader lists them as
unexpected under their timm name.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

CONVNEXT, VIT = "convnext", "vit"
_CLASSIFIER = {CONVNEXT: "head.fc", VIT: "head"}
_HEAD_NORM = "head.norm"
# Every module of each layout (our spelling) and the leaves it holds.
_MODULES = {
    CONVNEXT: re.compile(r"stem_[01]|stages_\d+/downsample_[01]"
                         r"|stages_\d+/blocks_\d+(/conv_dw|/norm|/mlp/fc[12])?"),
    VIT: re.compile(r"|patch_embed/proj|norm"
                    r"|blocks_\d+/(norm[12]|attn/qkv|attn/proj|mlp/fc[12])"),
}
_NORMS = re.compile(r"norm\d?|stem_1|downsample_0")
_OWN_LEAVES = {"gamma": re.compile(r"stages_\d+/blocks_\d+"),  # layer scale
               "cls_token": re.compile(""), "pos_embed": re.compile("")}


def source_family(keys) -> str | None:
  """``'convnext'`` or ``'vit'`` for a timm state dict's keys, else None."""
  keys = list(keys)
  if any(k.startswith("stem.") for k in keys) and any(
      k.startswith("stages.") for k in keys):
    return CONVNEXT
  if any(k.startswith("patch_embed.") for k in keys):
    return VIT
  return None


def flat_family(flat_keys) -> str | None:
  """``'convnext'`` or ``'vit'`` for our flat names of such a model."""
  for k in flat_keys:
    if k.startswith("params/backbone/stem_"):
      return CONVNEXT
    if k.startswith("params/backbone/patch_embed/"):
      return VIT
  return None


def timm_name_to_flat(family: str, key: str) -> str | None:
  """Our flat name of a timm key, or None if the layout has no such key."""
  module, _, leaf = key.rpartition(".")
  if module == _CLASSIFIER[family] and leaf in ("weight", "bias"):
    return "params/classifier/" + ("kernel" if leaf == "weight" else "bias")
  if family == CONVNEXT and module == _HEAD_NORM and leaf in ("weight", "bias"):
    return "params/head_norm/" + ("scale" if leaf == "weight" else "bias")
  ours = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", module).replace(".", "/")
  if leaf in _OWN_LEAVES:
    ok = _OWN_LEAVES[leaf].fullmatch(ours)
  else:
    ok = leaf in ("weight", "bias") and ours and _MODULES[family].fullmatch(ours)
  if not ok:
    return None
  if leaf == "weight":
    leaf = "scale" if _NORMS.fullmatch(ours.rsplit("/", 1)[-1]) else "kernel"
  return "/".join(filter(None, ("params/backbone", ours, leaf)))


def flat_name_to_timm(family: str, flat: str) -> str:
  """The timm key of one of our flat names (for error messages)."""
  module, _, leaf = flat.split("/", 1)[1].rpartition("/")  # drop the collection
  if module == "classifier":
    return f"{_CLASSIFIER[family]}.{'weight' if leaf == 'kernel' else 'bias'}"
  if module == "head_norm":
    return f"{_HEAD_NORM}.{'weight' if leaf == 'scale' else 'bias'}"
  module = module.removeprefix("backbone").lstrip("/")
  module = re.sub(r"_(\d+)(?=/|$)", r".\1", module).replace("/", ".")
  leaf = "weight" if leaf in ("kernel", "scale") else leaf
  return f"{module}.{leaf}" if module else leaf


def _count(flat, pattern: str) -> int:
  found = {int(m[1]) for k in flat for m in [re.match(pattern, k)] if m}
  return max(found) + 1 if found else 0


def layout(family: str, flat: Mapping[str, Any]) -> tuple:
  """The architecture of flat weights, as far as shapes tell it.

  ConvNeXt: ``(blocks per stage, channels per stage)``; ViT: ``(blocks,
  token width, patch size, position tokens)`` (the number of heads is not
  in the weights).
  """
  if family == CONVNEXT:
    stages = _count(flat, r"params/backbone/stages_(\d+)/")
    depths = tuple(_count(flat, rf"params/backbone/stages_{s}/blocks_(\d+)/")
                   for s in range(stages))
    dims = tuple(int(flat[f"params/backbone/stages_{s}/blocks_0/gamma"].shape[0])
                 for s in range(stages)
                 if f"params/backbone/stages_{s}/blocks_0/gamma" in flat)
    return depths, dims
  patch = flat.get("params/backbone/patch_embed/proj/kernel")
  pos = flat.get("params/backbone/pos_embed")
  return (_count(flat, r"params/backbone/blocks_(\d+)/"),
          None if pos is None else int(pos.shape[-1]),
          None if patch is None else int(patch.shape[0]),
          None if pos is None else int(pos.shape[1]))


def describe(family: str, flat: Mapping[str, Any]) -> str:
  """E.g. 'ConvNeXt blocks (3, 3, 9, 3), channels (96, 192, 384, 768), 1000
  classes' or 'ViT 12 blocks, width 384, 16-pixel patches, 197 position
  tokens, 1000 classes'."""
  fc = flat.get("params/classifier/kernel")
  classes = f"{fc.shape[-1]} classes" if fc is not None else "no classifier"
  if family == CONVNEXT:
    depths, dims = layout(family, flat)
    return f"ConvNeXt blocks {depths}, channels {dims}, {classes}"
  depth, width, patch, tokens = layout(family, flat)
  return (f"ViT {depth} blocks, width {width}, {patch}-pixel patches, "
          f"{tokens} position tokens, {classes}")
