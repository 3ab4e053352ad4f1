r"""The BR-NPA ablations on CUB-200-2011, one run per variant.

  random_vectors  each round selects a uniformly random position, without
                  suppression, instead of the most active one (init=random)
  no_refine       no refinement of the representative vectors
  both            random_vectors and no_refine together
  aux_heads       five extra stop-gradient heads on slices of the K=3
                  vectors, each with its own accuracy (SPEC section 2)

Launch (from the repository root; weights: see ``configs/common.py``):

  for v in random_vectors no_refine both aux_heads; do
    python train.py \
        --config "configs/cub_ablation.py:variant=$v,init_from=weights/resnet50.npz" \
        --workdir runs/cub_ablation_$v
  done

Low resolution by default, as ``cub_brnpa_lowres`` (the reference it is
compared with); ``res=high`` ablates the high-resolution model instead.
Other switches: those of ``configs/common.py``.
"""

import ml_collections

from configs import common

VARIANTS = {
    "random_vectors": dict(init="random"),
    "no_refine": dict(refine=False),
    "both": dict(init="random", refine=False),
    "aux_heads": dict(aux_heads=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse(arg, {"variant": "random_vectors"},
                   {"variant": tuple(VARIANTS)})
  c = common.paper_config(a, head="brnpa")
  c.model.update(VARIANTS[a["variant"]])
  return common.finish(c, a)
