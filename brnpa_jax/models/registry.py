"""The model zoo by name, and ``build_model`` from the ``model`` section of a config."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from brnpa_jax.models import convnext, resnet, resnet12, vit
from brnpa_jax.models.classifier import Classifier
from brnpa_jax.models.heads import HEADS, BCNNHead, BRNPAHead

# Backbones: each maps images (B, H, W, 3) to a feature map (B, h, w, C). Its
# family (the class behind the preset) declares ``resolutions`` (what each
# ``res`` means for it, as constructor arguments), ``nonnegative_features``
# and optionally ``pooled_norm``, and takes ``width`` (64: the published
# channel count) and ``dtype``. ConvNeXt and ViT names are timm's.
BACKBONES = {
    "resnet18": resnet.ResNet18,
    "resnet34": resnet.ResNet34,
    "resnet50": resnet.ResNet50,
    "resnet101": resnet.ResNet101,
    "resnet152": resnet.ResNet152,
    "resnet_tiny": resnet.ResNetTiny,
    # Few-shot embedding networks.
    "resnet12": resnet12.ResNet12,
    "resnet12_narrow": resnet12.ResNet12Narrow,
    "convnext_tiny": convnext.ConvNeXtTiny,
    "convnext_small": convnext.ConvNeXtSmall,
    "convnext_base": convnext.ConvNeXtBase,
    "convnext_large": convnext.ConvNeXtLarge,
    "convnext_test": convnext.ConvNeXtTest,
    "vit_tiny_patch16_224": vit.ViTTiny16,
    "vit_small_patch16_224": vit.ViTSmall16,
    "vit_base_patch16_224": vit.ViTBase16,
    "deit_tiny_patch16_224": vit.ViTTiny16,
    "deit_small_patch16_224": vit.ViTSmall16,
    "deit_base_patch16_224": vit.ViTBase16,
    "vit_test": vit.ViTTest,
}
# Each family's smallest preset, which ``runlocal`` configs switch to.
TINY_PRESETS = {resnet.ResNet: "resnet_tiny", resnet12.ResNet12: "resnet_tiny",
                convnext.ConvNeXt: "convnext_test",
                vit.VisionTransformer: "vit_test"}

# Resolution: per-stage strides of a ResNet (whose stem downsamples by 4).
STRIDES = {"low": resnet.LOW_RES_STRIDES, "high": resnet.HIGH_RES_STRIDES,
           "reid_high": resnet.REID_HIGH_RES_STRIDES}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# ConvNeXt's and ViT's ``stem``: timm's patchify stem, or a conv stem.
STEMS = ("patch", "conv")


def _choose(kind: str, name: str, options) -> None:
  if name not in options:
    raise ValueError(f"Unknown {kind} {name!r}; valid: {sorted(options)}.")


def family(backbone: str) -> type:
  """The class behind a ``BACKBONES`` preset (``ResNet``, ``ConvNeXt``, ...)."""
  _choose("backbone", backbone, BACKBONES)
  make = BACKBONES[backbone]
  return getattr(make, "func", make)


def tiny_preset(backbone: str) -> str:
  """The smallest preset of ``backbone``'s family (for ``runlocal``)."""
  return TINY_PRESETS[family(backbone)]


def backbone_kwargs(model_cfg, dtype=jnp.float32) -> dict:
  """Constructor arguments of the config's backbone: its family translates
  ``res``; ``width``, ``patch_size``, ``img_size``, ``drop_path_rate``,
  ``stem`` and ``zero_init_residual`` go to the families that have them."""
  cls = family(model_cfg.backbone)
  if model_cfg.res not in cls.resolutions:
    raise ValueError(
        f"Backbone {model_cfg.backbone!r} has no resolution {model_cfg.res!r}; "
        f"valid: {sorted(cls.resolutions)}.")
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = dict(cls.resolutions[model_cfg.res], dtype=dtype)
  # Set (non-zero) fields go to the families that have them; the small-image
  # variants are ``patch_size`` (ConvNeXt's stem, a ViT's patches) and
  # ``img_size`` (the grid a ViT's position embeddings are stored for).
  for name in ("width", "patch_size", "img_size", "drop_path_rate", "stem"):
    if model_cfg.get(name) and name in fields:
      kwargs[name] = model_cfg[name]
  if (model_cfg.get("zero_init_residual") is not None
      and "zero_init_residual" in fields):
    kwargs["zero_init_residual"] = model_cfg.zero_init_residual
  return kwargs


def feature_grid(model_cfg, image_hw) -> tuple[int, int]:
  """The (h, w) of the feature map the config's backbone gives an input of
  ``image_hw`` (an int side or an (H, W) pair), from its strides alone: no
  network is built or traced. A side of 0 means the input is smaller than
  the backbone's output stride (or a ViT's patch)."""
  h, w = (image_hw, image_hw) if isinstance(image_hw, int) else image_hw
  backbone = BACKBONES[model_cfg.backbone](**backbone_kwargs(model_cfg))
  return backbone.feature_grid(int(h), int(w))


def build_model(model_cfg, num_classes: int, dtype: str = "float32") -> Classifier:
  """Builds the classifier a config describes.

  Args:
    model_cfg: ConfigDict with ``backbone`` (a ``BACKBONES`` key), ``head``
      (``gap|bcnn|brnpa``), ``res`` (a key of the backbone family's
      ``resolutions``: ``low|high`` for all, ``reid_high`` for the
      convolutional ones), ``num_maps``, ``refine``, ``init``,
      ``aux_heads``, ``dropout``, ``use_bias`` and optionally ``width``,
      ``patch_size``, ``img_size``, ``drop_path_rate``, ``stem`` (0, '' or
      absent: the preset's), ``zero_init_residual`` and ``freeze_bn``.
    num_classes: size of the output layer.
    dtype: computation dtype name, ``float32`` or ``bfloat16``.

  Returns:
    An unbound ``Classifier``.
  """
  _choose("backbone", model_cfg.backbone, BACKBONES)
  _choose("head", model_cfg.head, HEADS)
  _choose("dtype", dtype, DTYPES)
  dt = DTYPES[dtype]
  backbone = BACKBONES[model_cfg.backbone](**backbone_kwargs(model_cfg, dt))
  if model_cfg.head == "brnpa":
    head = BRNPAHead(num_maps=model_cfg.num_maps, refine=model_cfg.refine,
                     init=model_cfg.init,
                     relu_input=not backbone.nonnegative_features, dtype=dt)
  elif model_cfg.head == "bcnn":
    head = BCNNHead(num_maps=model_cfg.num_maps, dtype=dt)
  else:
    head = HEADS["gap"](dtype=dt)
  if model_cfg.aux_heads and model_cfg.head != "brnpa":
    raise ValueError("aux_heads is an ablation of the brnpa head; set "
                     f"head=brnpa or aux_heads=False (head={model_cfg.head!r}).")
  return Classifier(backbone=backbone, head=head, num_classes=num_classes,
                    dropout=model_cfg.dropout, use_bias=model_cfg.use_bias,
                    aux_heads=model_cfg.aux_heads,
                    freeze_bn=model_cfg.get("freeze_bn", False), dtype=dt)
