r"""Person re-identification with BR-NPA on Market-1501 (or DukeMTMC-reID).

Launch (from the repository root), the archive unpacked in ``data_dir``
(default ``~/datasets``, holding ``Market-1501-v15.09.15/`` or
``DukeMTMC-reID/``, or the dataset folder itself: ``bounding_box_train/``,
``query/``, ``bounding_box_test/``):

  python train.py --config configs/reid_market1501.py --workdir runs/reid_market

Switches go after a colon, comma-separated; a bare switch means true:

  python train.py --config 'configs/reid_market1501.py:dataset=dukemtmc' \
      --workdir runs/reid_duke
  python train.py --config 'configs/reid_market1501.py:data_dir=/data/market' \
      --workdir runs/reid_market
  python train.py --config 'configs/reid_market1501.py:head=gap,res=low' \
      --workdir runs/reid_gap
  python train.py --config 'configs/reid_market1501.py:runlocal,data_dir=/tmp/m' \
      --workdir /tmp/reid_smoke

Switches: dataset (market1501|dukemtmc), data_dir, head (brnpa|bcnn|gap),
backbone (resnet18|34|50|101|152|resnet_tiny), res (reid_high: the first
block of stages 2-4 at stride 1, output stride 4, a 64x32 map at 256x128;
high: output stride 8; low: 32), k (number of maps), p (identities per
batch), per_id (images per identity; batch = p x per_id), soft_margin,
val_identities (training identities held out for model selection; 0:
select on the test query/gallery, as re-id papers do: optimistic), dtype,
epochs, runlocal (the tiny model of the backbone's family, 32x16 images,
seconds; switches given explicitly keep their values). Any field can also be
set with ``--config.<field>=<value>``.

The recipe is Luo et al.'s "Bag of Tricks" baseline: Adam 3.5e-4 with 10
warm-up epochs, weight decay 5e-4, 120 epochs, x0.1 every 40 after warm-up,
label smoothing 0.1, triplet margin 0.3, random erasing p=0.5 (ImageNet-mean
fill), flip, pad 10 and crop. Backbones start from random weights unless a
pretrained-weights loader is configured.
"""

import ml_collections

from brnpa_jax.config_args import parse_arg
from brnpa_jax.models import BACKBONES, HEADS, STRIDES
from brnpa_jax.models.registry import tiny_preset

SWITCHES = {
    "dataset": "market1501", "data_dir": "~/datasets", "head": "brnpa",
    "backbone": "resnet50", "res": "reid_high", "k": 3, "p": 16, "per_id": 4,
    "soft_margin": False, "val_identities": 0, "dtype": "float32",
    "epochs": 0, "runlocal": False,  # epochs 0: 120, or 2 with runlocal
}
CHOICES = {"dataset": ("market1501", "dukemtmc"), "head": tuple(HEADS),
           "backbone": tuple(BACKBONES), "res": tuple(STRIDES),
           "dtype": ("float32", "bfloat16")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The re-id config, adjusted by the ``arg`` switches."""
  a = parse_arg(arg, SWITCHES, CHOICES)
  c = ml_collections.ConfigDict()
  c.task = "reid"
  c.seed = 0
  c.dtype = a["dtype"]
  c.mesh = ml_collections.ConfigDict(dict(num_devices=0, fsdp=1))

  c.data = ml_collections.ConfigDict(dict(
      name=a["dataset"], data_dir=a["data_dir"],
      height=256, width=128, image_size=(256, 128),  # (H, W) for the trainer
      ids_per_batch=a["p"], images_per_id=a["per_id"],
      flip=True, pad=10, erasing_p=0.5, erasing_fill="mean",
      val_identities=a["val_identities"], num_threads=8))

  c.model = ml_collections.ConfigDict(dict(
      backbone=a["backbone"], width=0, res=a["res"], head=a["head"],
      num_maps=a["k"],
      refine=True, init="norm", aux_heads=False, dropout=0.0, use_bias=False,
      zero_init_residual=False, freeze_bn=False))

  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=3.5e-4, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
      weight_decay=5e-4, schedule="step", warmup_epochs=10,
      step_every_epochs=40, step_gamma=0.1, grad_clip_norm=0.0))
  c.label_smoothing = 0.1
  c.reid = ml_collections.ConfigDict(dict(
      triplet_margin=0.3, soft_margin=a["soft_margin"], triplet_weight=1.0,
      eval_block_size=256, num_retrieved=5))

  c.batch_size = a["p"] * a["per_id"]  # global: P identities x K images
  c.grad_accum_steps = 1
  c.eval_batch_size = 128
  c.num_epochs = a["epochs"] or 120
  # Steps with a non-finite loss, gradient or update are skipped; more stop
  # the run.
  c.max_nonfinite_steps = 10
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.max_to_keep = 2
  c.num_overlays = 6

  if a["runlocal"]:
    c.model.backbone, c.model.width = tiny_preset(a["backbone"]), 8
    c.data.height, c.data.width, c.data.image_size = 32, 16, (32, 16)
    c.data.pad, c.data.num_threads = 2, 2
    c.optim.lr, c.optim.warmup_epochs = 1e-3, 0
    c.eval_batch_size, c.num_epochs = 16, a["epochs"] or 2
    c.log_every_steps, c.checkpoint_every_steps, c.num_overlays = 2, 4, 2
    c.reid.eval_block_size, c.reid.num_retrieved = 8, 3
  c.lock()
  return c
