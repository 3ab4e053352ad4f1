"""The embedded dataset's recipe: what ``configs/default.py`` returns, and
the base of ``configs/parts_compare.py``.

ResNet-18 layout of width 16, BR-NPA K=3 at high resolution, 64 px images of
the procedural parts dataset, 12 epochs of AdamW with a cosine schedule.
"""

import ml_collections

from brnpa_jax.config_args import parse_arg
from brnpa_jax.data.catalog import default_data_config
from brnpa_jax.models import BACKBONES, HEADS, STRIDES
from brnpa_jax.models.registry import STEMS, tiny_preset

SWITCHES = {
    "head": "brnpa", "backbone": "resnet18", "width": 16, "res": "high", "k": 3,
    "refine": True, "init": "norm", "aux_heads": False, "dtype": "float32",
    "epochs": 0, "runlocal": False,  # epochs 0: 12, or 2 with runlocal
    # Small-image variants of ConvNeXt / ViT (0: the preset's; see
    # docs/backbones.md): the stem's or the patches' side, and stochastic depth.
    "patch": 0, "drop_path": 0.0, "stem": "patch",
}
CHOICES = {"head": tuple(HEADS), "backbone": tuple(BACKBONES),
           "res": tuple(STRIDES), "init": ("norm", "random"),
           "dtype": ("float32", "bfloat16"), "stem": STEMS}


def default_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config (``configs/default.py``), adjusted by the ``arg``
  switches."""
  a = parse_arg(arg, SWITCHES, CHOICES)
  c = ml_collections.ConfigDict()
  c.task = "classification"  # a key of brnpa_jax.tasks.TASKS
  c.seed = 0
  c.dtype = a["dtype"]
  # Devices (0: all, every process's) arranged as a (data, fsdp) mesh; fsdp > 1
  # also shards parameters and optimizer state.
  c.mesh = ml_collections.ConfigDict(dict(num_devices=0, fsdp=1))

  c.data = default_data_config()

  c.model = ml_collections.ConfigDict(dict(
      backbone=a["backbone"], width=a["width"], res=a["res"], head=a["head"],
      num_maps=a["k"], refine=a["refine"], init=a["init"],
      aux_heads=a["aux_heads"], dropout=0.0, use_bias=True,
      zero_init_residual=True, freeze_bn=False,
      # ConvNeXt / ViT only; 0: the preset's. A ViT with its own patch size
      # stores its position embeddings for the images it trains on.
      patch_size=a["patch"], drop_path_rate=a["drop_path"], stem=a["stem"],
      img_size=c.data.image_size if a["patch"] else 0))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-3, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
      weight_decay=1e-4, schedule="cosine", warmup_epochs=0.5,
      step_every_epochs=2, step_gamma=0.9, grad_clip_norm=0.0))
  c.label_smoothing = 0.0
  # Pretrained backbone (.npz from brnpa_jax.tools.convert_weights, .safetensors
  # or .pth), loaded at the start of a fresh run, classifier skipped; '' = none.
  c.init_from = ""

  c.batch_size = 64  # global, over all devices and micro-batches
  c.grad_accum_steps = 1  # micro-batches per optimizer step
  c.eval_batch_size = 200
  c.num_epochs = a["epochs"] or 12
  c.early_stopping_patience = 0  # epochs without a better val accuracy; 0: off
  # Steps with a non-finite loss, gradient or update are skipped; more stop
  # the run.
  c.max_nonfinite_steps = 10
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  c.max_to_keep = 2
  c.num_overlays = 8

  if a["runlocal"]:  # what the switches leave to it: explicit ones stay
    c.model.backbone = tiny_preset(a["backbone"])
    if "width" not in a.given:
      c.model.width = 8
    c.data.parts.train_size, c.data.parts.validation_size = 256, 64
    c.data.parts.test_size = 64
    c.batch_size, c.eval_batch_size, c.num_epochs = 32, 32, a["epochs"] or 2
    c.log_every_steps, c.checkpoint_every_steps, c.num_overlays = 4, 4, 4
  c.lock()
  return c
