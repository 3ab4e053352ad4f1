r"""The plain CNN baseline (global average pooling) on CUB-200-2011.

Launch (from the repository root; weights: see ``configs/common.py``):

  python train.py --config 'configs/cub_cnn.py:init_from=weights/resnet50.npz' \
      --workdir runs/cub_cnn

``res=high`` trains it at output stride 8; ``dataset=...`` switches the
dataset (see ``configs/common.py``); ``runlocal`` is a smoke test. Writes
checkpoints, metrics, overlays and ``summary.json`` to the workdir.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse(arg, drop=("k",))
  return common.finish(common.paper_config(a, head="gap"), a)
