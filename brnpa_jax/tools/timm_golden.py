r"""Random timm-layout ConvNeXt / ViT weights, and golden outputs from timm.

``random_state_dict`` draws a state dict in timm's key layout (the keys and
shapes of ``timm_shapes``, written from the architecture, not from our
modules) from a numpy seed; the tests and this script share it, so no
weights are stored. Regenerate the golden files (needs torch and timm):

  python -m brnpa_jax.tools.timm_golden --out tests/golden

It writes ``timm_layouts.json`` (key -> shape of timm's own model of every
registered timm name, ConvNeXt-T/S/B/L, ViT and DeiT Ti/S/B: the full-size
layouts, checked without weights) and, for each case of ``CASES``,
``timm_<case>.npz``: timm's model on the random weights, in eval mode, run
on ``golden_input``, giving the logits and the last feature grid (NHWC),
whole up to 8x8 and else on the sub-grid ``[::3, ::3]`` (all channels),
which keeps each file under 0.2 MB. The logits pool every position, so all
of them are checked. Our models pool the feature grid: the ViT cases run timm's model
with ``global_pool='avg', fc_norm=False`` (the same weights and keys; the
mean of the normalised patch tokens), ConvNeXt's head is timm's own.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
from absl import flags

from brnpa_jax import cli
from brnpa_jax.models.convnext import ConvNeXt
from brnpa_jax.models.registry import BACKBONES, TINY_PRESETS, family
from brnpa_jax.models.vit import VisionTransformer

GOLDEN_SEED = 0
GOLDEN_CLASSES = 1000
# Stored features: the whole grid up to 8x8, else every third row and column.
FULL_GRID, GRID_STEP = 64, 3
TIMM_NAMES = tuple(n for n in BACKBONES
                   if family(n) in (ConvNeXt, VisionTransformer)
                   and n not in TINY_PRESETS.values())


class Case(NamedTuple):
  """One golden comparison: a timm model at one of our resolutions."""
  arch: str
  res: str                      # our config's res
  input_hw: tuple[int, int]     # the image size fed to both


CASES = {
    # Output stride 32: a 2x2 grid.
    "convnext_tiny_low": Case("convnext_tiny", "low", (64, 64)),
    # Last two downsampling layers at stride 1 (timm's convs patched to
    # stride 1, 'same' padding): 8x8.
    "convnext_tiny_high": Case("convnext_tiny", "high", (64, 64)),
    # The native 14x14 grid, no interpolation.
    "vit_small_224": Case("vit_small_patch16_224", "low", (224, 224)),
    # A larger, non-square input: position embeddings resampled 14x14 ->
    # 18x15 (timm: dynamic_img_size, its resample_abs_pos_embed).
    "vit_small_288x240": Case("vit_small_patch16_224", "low", (288, 240)),
    # Patches at stride 8 with 4-pixel padding (timm's proj conv patched):
    # 16x16 at 128 px, embeddings resampled 14x14 -> 16x16.
    "vit_small_overlap": Case("vit_small_patch16_224", "high", (128, 128)),
}


def grid_step(grid_hw) -> int:
  """Stride of the stored sub-grid of a feature grid's rows and columns."""
  return 1 if grid_hw[0] * grid_hw[1] <= FULL_GRID else GRID_STEP


def golden_input(case: Case, seed: int = GOLDEN_SEED) -> np.ndarray:
  """The (1, H, W, 3) float32 image a case's outputs were computed on."""
  return np.random.default_rng(seed + 1).normal(
      size=(1, *case.input_hw, 3)).astype(np.float32)


def timm_shapes(arch: str, num_classes: int = GOLDEN_CLASSES
                ) -> dict[str, tuple[int, ...]]:
  """timm key -> shape of a registered ConvNeXt / ViT preset, in timm's order."""
  net = BACKBONES[arch]()
  out = {}
  if isinstance(net, ConvNeXt):
    dims = net.channels
    p = net.patch_size
    out["stem.0.weight"], out["stem.0.bias"] = (dims[0], 3, p, p), (dims[0],)
    out["stem.1.weight"] = out["stem.1.bias"] = (dims[0],)
    for s, (depth, c) in enumerate(zip(net.depths, dims)):
      p = f"stages.{s}."
      if s:
        out[p + "downsample.0.weight"] = out[p + "downsample.0.bias"] = (dims[s - 1],)
        out[p + "downsample.1.weight"] = (c, dims[s - 1], 2, 2)
        out[p + "downsample.1.bias"] = (c,)
      for i in range(depth):
        b = f"{p}blocks.{i}."
        out[b + "gamma"] = (c,)
        out[b + "conv_dw.weight"], out[b + "conv_dw.bias"] = (c, 1, 7, 7), (c,)
        out[b + "norm.weight"] = out[b + "norm.bias"] = (c,)
        out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = (4 * c, c), (4 * c,)
        out[b + "mlp.fc2.weight"], out[b + "mlp.fc2.bias"] = (c, 4 * c), (c,)
    out["head.norm.weight"] = out["head.norm.bias"] = (dims[-1],)
    out["head.fc.weight"], out["head.fc.bias"] = (num_classes, dims[-1]), (num_classes,)
    return out
  c, p, gh, gw = net.channels, net.patch_size, *net.pos_grid
  hidden = int(c * net.mlp_ratio)
  out["cls_token"], out["pos_embed"] = (1, 1, c), (1, 1 + gh * gw, c)
  out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = (c, 3, p, p), (c,)
  for i in range(net.depth):
    b = f"blocks.{i}."
    out[b + "norm1.weight"] = out[b + "norm1.bias"] = (c,)
    out[b + "attn.qkv.weight"], out[b + "attn.qkv.bias"] = (3 * c, c), (3 * c,)
    out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = (c, c), (c,)
    out[b + "norm2.weight"] = out[b + "norm2.bias"] = (c,)
    out[b + "mlp.fc1.weight"], out[b + "mlp.fc1.bias"] = (hidden, c), (hidden,)
    out[b + "mlp.fc2.weight"], out[b + "mlp.fc2.bias"] = (c, hidden), (c,)
  out["norm.weight"] = out["norm.bias"] = (c,)
  out["head.weight"], out["head.bias"] = (num_classes, c), (num_classes,)
  return out


def random_state_dict(arch: str, num_classes: int = GOLDEN_CLASSES,
                      seed: int = GOLDEN_SEED) -> dict[str, np.ndarray]:
  """A timm-layout state dict of random but well-scaled weights.

  Convolutions and linear layers get fan-in scaled normals, LayerNorms
  random affine parameters, biases and ConvNeXt's layer scales values far
  from their initialisation, ViT's class token and position embeddings unit
  scale: activations stay O(1) through the full depth and every tensor
  moves the output.

  Args:
    arch: a registered timm name (``TIMM_NAMES``) or a test preset.
    num_classes: rows of the classifier.
    seed: numpy seed; the same seed gives the same dict.

  Returns:
    timm key -> float32 numpy array.
  """
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in timm_shapes(arch, num_classes).items():
    module, _, leaf = key.rpartition(".")
    if leaf == "weight" and len(shape) > 1:
      fan_in = int(np.prod(shape[1:]))
      gain = 2.0 if module.endswith(("fc1", "conv_dw", "stem.0")) else 1.0
      value = rng.normal(0, np.sqrt(gain / fan_in), shape)
    elif leaf == "weight":  # LayerNorm
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "gamma":
      value = rng.uniform(0.1, 0.5, shape)
    elif leaf in ("cls_token", "pos_embed"):
      value = rng.normal(0, 1.0 if leaf == "cls_token" else 0.5, shape)
    else:
      value = rng.normal(0, 0.1, shape)
    sd[key] = value.astype(np.float32)
  return sd


# -- generation (needs torch and timm) -------------------------------------------
def _timm_model(case: Case, sd):
  """timm's model of ``case`` holding ``sd`` (strict), eval mode, with our
  resolution applied."""
  import timm  # pylint: disable=g-import-not-at-top  # optional: regeneration only
  import torch  # pylint: disable=g-import-not-at-top
  is_vit = family(case.arch) is VisionTransformer
  kwargs = dict(dynamic_img_size=True, global_pool="avg", fc_norm=False) if is_vit else {}
  model = timm.create_model(case.arch, pretrained=False, **kwargs)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  if case.res == "high" and not is_vit:
    for stage in model.stages[2:]:
      stage.downsample[1].stride, stage.downsample[1].padding = (1, 1), "same"
  elif case.res == "high":
    p = model.patch_embed.proj.kernel_size[0]
    model.patch_embed.proj.stride = (p // 2, p // 2)
    model.patch_embed.proj.padding = (p // 4, p // 4)
  return model.eval()


def timm_outputs(case: Case) -> dict[str, np.ndarray]:
  """timm's logits and sub-sampled features for ``random_state_dict``."""
  import timm  # pylint: disable=g-import-not-at-top  # optional: regeneration only
  import torch  # pylint: disable=g-import-not-at-top
  sd = random_state_dict(case.arch)
  model = _timm_model(case, sd)
  x = torch.from_numpy(golden_input(case).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    feats = model.forward_features(x)
    logits = model(x)
  if feats.ndim == 4:  # ConvNeXt: NCHW
    feats = feats.permute(0, 2, 3, 1)
  else:  # ViT: (B, 1 + N, C) -> the patch grid
    s = model.patch_embed.proj.stride[0]
    pad = model.patch_embed.proj.padding[0]
    k = model.patch_embed.proj.kernel_size[0]
    gh, gw = ((n + 2 * pad - k) // s + 1 for n in case.input_hw)
    feats = feats[:, 1:].reshape(1, gh, gw, -1)
  feats = feats.numpy()
  step = grid_step(feats.shape[1:3])
  return {"features_grid_shape": np.array(feats.shape[1:3]),
          "features": feats[:, ::step, ::step],
          "logits": logits.numpy(),
          "timm_version": np.array(timm.__version__)}


def timm_layouts() -> dict[str, list]:
  """[key, shape] of timm's own model for every name in ``TIMM_NAMES``."""
  import timm  # pylint: disable=g-import-not-at-top  # optional: regeneration only
  out = {}
  for name in TIMM_NAMES:
    sd = timm.create_model(name, pretrained=False).state_dict()
    out[name] = [[k, list(v.shape)] for k, v in sd.items()]
  return out


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("out", os.path.join("tests", "golden"),
                      "Folder for the golden files.", flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  os.makedirs(fv.out, exist_ok=True)
  path = os.path.join(fv.out, "timm_layouts.json")
  with open(path, "w") as f:
    json.dump(timm_layouts(), f, separators=(",", ":"))
  print(f"{path}: {len(TIMM_NAMES)} architectures")
  for name, case in CASES.items():
    outputs = timm_outputs(case)
    path = os.path.join(fv.out, f"timm_{name}.npz")
    np.savez_compressed(path, **outputs)
    grid = tuple(int(n) for n in outputs["features_grid_shape"])
    print(f"{path}: grid {grid}, stored "
          f"features {outputs['features'].shape}, |features| max "
          f"{np.abs(outputs['features']).max():.3g}, |logits| max "
          f"{np.abs(outputs['logits']).max():.3g}")


def main(argv=None) -> int:
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.timm_golden")


if __name__ == "__main__":
  raise SystemExit(main())
