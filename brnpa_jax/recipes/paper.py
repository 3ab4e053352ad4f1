"""What the paper's configs share: the CUB recipe (docs/method.md#training-recipe).

ResNet-50 (ImageNet weights from ``init_from``), 448 px, SGD lr 1e-3 with
momentum 0.9, batch 12, 50 epochs, the learning rate x0.9 every 2 epochs,
the best epoch chosen on validation accuracy, early stopping after
``EARLY_STOPPING_PATIENCE`` epochs without a better one.

Every paper config takes these switches (``configs/<file>.py:dataset=cars196``):

  dataset    caltech_birds2011 (default) | cars196 | stanford_dogs |
             oxford_flowers102 | oxford_iiit_pet | folder
  data_dir   TFDS data directory (default ~/tensorflow_datasets); for
             dataset=folder, the folder holding train/ (and test/)
  size       448 (default) or 224
  backbone   resnet50 (default), any of brnpa_jax.models.BACKBONES
  res        low (output stride 32) or high (stride 8), where the config
             does not fix it (bcnn, cnn, ablation)
  k          number of attention maps (3; not for the cnn)
  epochs     0 = the recipe's 50 (2 with runlocal)
  batch      global batch size (12)
  init_from  converted ImageNet weights of the backbone (see below)
  patience   early-stopping patience in epochs (0: off)
  dtype      float32 | bfloat16
  runlocal   a smoke test: the tiny model of the backbone's family
             (resnet_tiny), batch 16, 2 epochs, 32 px (64 px when a model is
             at low resolution: a 2x2 map, room for K=3); switches given
             explicitly (size, batch, epochs) keep their values

Pretrained weights: ``python -m brnpa_jax.tools.convert_weights --weights IN --out OUT``
turns a torchvision / timm ResNet checkpoint (``.pth``, ``.safetensors``,
``.npz``) into the file ``init_from`` reads; the classifier is not loaded.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from brnpa_jax.config_args import Switches, parse_arg
from brnpa_jax.data.catalog import FINE_GRAINED, fine_grained_data_config
from brnpa_jax.models import BACKBONES, STRIDES
from brnpa_jax.models.registry import tiny_preset

EARLY_STOPPING_PATIENCE = 10  # epochs; our choice, the paper does not say

SWITCHES = {
    "dataset": "caltech_birds2011", "data_dir": "", "size": 448,
    "backbone": "resnet50", "res": "low", "k": 3, "epochs": 0, "batch": 12,
    "init_from": "", "patience": EARLY_STOPPING_PATIENCE, "dtype": "float32",
    "runlocal": False,
}
CHOICES = {"dataset": tuple(FINE_GRAINED) + ("folder",), "size": (224, 448),
           "backbone": tuple(BACKBONES), "res": tuple(STRIDES),
           "dtype": ("float32", "bfloat16")}


def run_name(dataset: str) -> str:
  """Short dataset name used in workdirs: ``cub`` for caltech_birds2011."""
  return "cub" if dataset == "caltech_birds2011" else dataset


def parse(arg: str | None, extra: Mapping[str, Any] | None = None,
          extra_choices: Mapping[str, tuple] | None = None,
          drop: tuple[str, ...] = ()) -> Switches:
  """The common switches (less ``drop``, those a config fixes) plus a
  config's own, parsed from ``arg``."""
  switches = {k: v for k, v in {**SWITCHES, **(extra or {})}.items()
              if k not in drop}
  out = parse_arg(arg, switches, {**CHOICES, **(extra_choices or {})})
  return Switches({**{k: SWITCHES[k] for k in drop}, **out}, out.given)


def paper_config(a: Mapping[str, Any], *, head: str,
                 res: str | None = None) -> ml_collections.ConfigDict:
  """The recipe for ``head`` with the parsed switches ``a``, unlocked.

  Args:
    a: switches from ``parse``.
    head: ``brnpa``, ``bcnn`` or ``gap``.
    res: fixes the resolution (else the ``res`` switch).

  Returns:
    A ConfigDict with every field the trainer reads; call ``finish`` on it.
  """
  c = ml_collections.ConfigDict()
  c.task = "classification"
  c.seed = 0
  c.dtype = a["dtype"]
  c.mesh = ml_collections.ConfigDict(dict(num_devices=0, fsdp=1))
  c.data = fine_grained_data_config(a["dataset"], a["data_dir"], a["size"])
  c.model = ml_collections.ConfigDict(dict(
      backbone=a["backbone"], width=64, res=res or a["res"], head=head,
      num_maps=a["k"], refine=True, init="norm", aux_heads=False, dropout=0.0,
      use_bias=True, zero_init_residual=True, freeze_bn=False))
  c.init_from = a["init_from"]
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=1e-3, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
      weight_decay=0.0, schedule="step", warmup_epochs=0.0,
      step_every_epochs=2, step_gamma=0.9, grad_clip_norm=0.0))
  c.label_smoothing = 0.0
  c.batch_size = a["batch"]  # global, over all devices and micro-batches
  c.grad_accum_steps = 1
  c.eval_batch_size = 48
  c.num_epochs = a["epochs"] or 50
  c.early_stopping_patience = a["patience"]
  # Steps with a non-finite loss, gradient or update are skipped; more stop
  # the run.
  c.max_nonfinite_steps = 10
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.max_to_keep = 2
  c.num_overlays = 8
  return c


def finish(c: ml_collections.ConfigDict, a: Switches
           ) -> ml_collections.ConfigDict:
  """Applies ``runlocal`` (tiny model, 32 or 64 px, batch 16, 2 epochs) and
  locks ``c``; a switch given explicitly (``size``, ``batch``, ``epochs``)
  keeps its value."""
  if a["runlocal"]:
    c.model.backbone, c.model.width = tiny_preset(a["backbone"]), 8
    if "size" not in a.given:
      # At output stride 32 (the model's, or a distillation teacher's) 32 px
      # is one position, and BR-NPA needs K of them.
      low = c.model.res == "low" or c.task == "distill"
      c.data.image_size = 64 if low else 32
    c.data.shuffle_buffer = 256
    if "batch" not in a.given:
      c.batch_size = 16
    c.eval_batch_size = 16
    c.num_epochs = a["epochs"] or 2
    c.log_every_steps, c.checkpoint_every_steps, c.num_overlays = 2, 4, 4
  c.lock()
  return c
