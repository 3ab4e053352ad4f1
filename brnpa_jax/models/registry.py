"""The model zoo by name, and ``build_model`` from the ``model`` section of a config."""

from __future__ import annotations

import jax.numpy as jnp

from brnpa_jax.models import resnet, resnet12
from brnpa_jax.models.classifier import Classifier
from brnpa_jax.models.heads import HEADS, BCNNHead, BRNPAHead

# Backbones: each maps images (B, H, W, 3) to a feature map (B, h, w, C) and
# takes ``strides`` (one of STRIDES), ``width`` and ``dtype``.
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
}

# Resolution: per-stage strides of a ResNet (whose stem downsamples by 4).
STRIDES = {"low": resnet.LOW_RES_STRIDES, "high": resnet.HIGH_RES_STRIDES,
           "reid_high": resnet.REID_HIGH_RES_STRIDES}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _choose(kind: str, name: str, options) -> None:
  if name not in options:
    raise ValueError(f"Unknown {kind} {name!r}; valid: {sorted(options)}.")


def build_model(model_cfg, num_classes: int, dtype: str = "float32") -> Classifier:
  """Builds the classifier a config describes.

  Args:
    model_cfg: ConfigDict with ``backbone`` (a ``BACKBONES`` key), ``head``
      (``gap|bcnn|brnpa``), ``res`` (``low|high``), ``num_maps``, ``refine``,
      ``init``, ``aux_heads``, ``dropout``, ``use_bias`` and optionally
      ``width``, ``zero_init_residual`` and ``freeze_bn``.
    num_classes: size of the output layer.
    dtype: computation dtype name, ``float32`` or ``bfloat16``.

  Returns:
    An unbound ``Classifier``.
  """
  _choose("backbone", model_cfg.backbone, BACKBONES)
  _choose("head", model_cfg.head, HEADS)
  _choose("resolution", model_cfg.res, STRIDES)
  _choose("dtype", dtype, DTYPES)
  dt = DTYPES[dtype]
  kwargs = {"strides": STRIDES[model_cfg.res], "dtype": dt}
  if model_cfg.get("width"):
    kwargs["width"] = model_cfg.width
  if model_cfg.get("zero_init_residual") is not None:
    kwargs["zero_init_residual"] = model_cfg.zero_init_residual
  backbone = BACKBONES[model_cfg.backbone](**kwargs)
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
