r"""BR-NPA at low resolution (output stride 32) on CUB-200-2011: the paper's
first run, and the teacher of ``cub_brnpa_highres_distill``.

Launch (from the repository root; weights: see ``brnpa_jax/recipes/paper.py``):

  python train.py \
      --config 'configs/cub_brnpa_lowres.py:init_from=weights/resnet50.npz' \
      --workdir runs/cub_brnpa_lowres

Other datasets: ``dataset=cars196`` (or stanford_dogs, oxford_flowers102,
oxford_iiit_pet; workdir runs/<dataset>_brnpa_lowres), or an image folder:
``dataset=folder,data_dir=/data/CUB_folder``. Smoke test:

  python train.py --config 'configs/cub_brnpa_lowres.py:runlocal' --workdir /tmp/smoke

Switches: those of ``brnpa_jax/recipes/paper.py``. Writes checkpoints (the best one in
``best/``), metrics, overlays and ``summary.json`` to the workdir.
"""

import ml_collections

from brnpa_jax.recipes import paper as common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse(arg, drop=("res",))
  return common.finish(common.paper_config(a, head="brnpa", res="low"), a)
