r"""B-CNN, the parametric attention baseline (docs/method.md#bcnn-the-parametric-baseline), on CUB-200-2011.

Launch (from the repository root; weights: see ``brnpa_jax/recipes/paper.py``):

  python train.py --config 'configs/cub_bcnn.py:init_from=weights/resnet50.npz' \
      --workdir runs/cub_bcnn

``res=high`` trains it at output stride 8; ``dataset=...`` switches the
dataset (see ``brnpa_jax/recipes/paper.py``); ``runlocal`` is a smoke test. Writes
checkpoints, metrics, overlays and ``summary.json`` to the workdir.
"""

import ml_collections

from brnpa_jax.recipes import paper as common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse(arg)
  return common.finish(common.paper_config(a, head="bcnn"), a)
