r"""The paper's comparison on a finer variant of the embedded dataset.

The default dataset's 64 px images give 2 x 2 low-resolution and 8 x 8
high-resolution maps, too coarse to show what the paper is about. This
variant draws 96 px images: low resolution (output stride 32) gives 3 x 3
maps of 32 px cells, larger than a part (15-24 px), high resolution (stride
8) 12 x 12 maps of 8 px cells. One command per row of the table in
docs/compare.md (each run trains the default ResNet-18 layout of width 16
for 14 epochs on 6,000 images):

  python train.py --config 'configs/parts_compare.py:model=cnn' --workdir runs/cmp_cnn
  python train.py --config 'configs/parts_compare.py:model=bcnn' --workdir runs/cmp_bcnn
  python train.py --config 'configs/parts_compare.py:model=brnpa_low' --workdir runs/cmp_brnpa_low
  python train.py --config 'configs/parts_compare.py:model=brnpa_high' --workdir runs/cmp_brnpa_high
  python train.py --config 'configs/parts_compare.py:model=brnpa_distill' \
      --workdir runs/cmp_brnpa_distill     # teacher: runs/cmp_brnpa_low (teacher=DIR)

``cnn`` is the plain CNN (global average pooling, low resolution) whose
post-hoc explanations (Grad-CAM, Grad-CAM++, Score-CAM, RISE) the paper
compares with; ``bcnn`` the parametric attention baseline and
``brnpa_high`` BR-NPA, both at high resolution without distillation;
``brnpa_distill`` the high-resolution BR-NPA student distilled from
``brnpa_low``. Other switches: ``epochs``, ``teacher``, ``runlocal`` (64 px,
little data, 1 epoch unless ``epochs`` is given).
"""

import ml_collections

from brnpa_jax.config_args import parse_arg
from brnpa_jax.recipes.embedded import default_config

MODELS = {  # model -> (head, resolution, task)
    "cnn": ("gap", "low", "classification"),
    "bcnn": ("bcnn", "high", "classification"),
    "brnpa_low": ("brnpa", "low", "classification"),
    "brnpa_high": ("brnpa", "high", "classification"),
    "brnpa_distill": ("brnpa", "high", "distill"),
}
SWITCHES = {"model": "brnpa_high", "epochs": 14, "teacher": "runs/cmp_brnpa_low",
            "runlocal": False}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, SWITCHES, {"model": tuple(MODELS)})
  head, res, task = MODELS[a["model"]]
  c = default_config(f"head={head},res={res}"
                         + (",runlocal" if a["runlocal"] else ""))
  c.unlock()
  c.task = task
  c.data.image_size = 96
  c.data.parts.validation_size, c.data.parts.test_size = 500, 500
  c.num_epochs = a["epochs"]
  if a["runlocal"]:  # an explicit epochs= stays
    c.data.image_size = 64
    c.data.parts.train_size, c.data.parts.validation_size = 64, 32
    c.data.parts.test_size, c.batch_size = 32, 32
    c.num_epochs = a["epochs"] if "epochs" in a.given else 1
  if task == "distill":
    # The paper's defaults (configs/cub_brnpa_highres_distill.py).
    c.distill = ml_collections.ConfigDict(dict(
        teacher_workdir=a["teacher"], temperature=11.0, alpha=0.55))
  c.lock()
  return c
