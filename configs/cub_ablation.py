r"""The BR-NPA ablations on CUB-200-2011, one run per variant.

  random_vectors  each round selects a uniformly random position, without
                  suppression, instead of the most active one (init=random)
  no_refine       no refinement of the representative vectors
  both            random_vectors and no_refine together
  aux_heads       five extra stop-gradient heads on slices of the K=3
                  vectors, each with its own accuracy (docs/method.md#auxiliary-heads)

Launch (from the repository root; weights: see ``brnpa_jax/recipes/paper.py``):

  for v in random_vectors no_refine both aux_heads; do
    python train.py \
        --config "configs/cub_ablation.py:variant=$v,init_from=weights/resnet50.npz" \
        --workdir runs/cub_ablation_$v
  done

High resolution without distillation by default, as the authors' release
runs its ablations (``train.sh``); ``res=low`` ablates the low-resolution
model instead.
Other switches: those of ``brnpa_jax/recipes/paper.py``.
"""

import ml_collections

from brnpa_jax.recipes import paper as common

VARIANTS = {
    "random_vectors": dict(init="random"),
    "no_refine": dict(refine=False),
    "both": dict(init="random", refine=False),
    "aux_heads": dict(aux_heads=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse(arg, {"variant": "random_vectors", "res": "high"},
                   {"variant": tuple(VARIANTS)})
  c = common.paper_config(a, head="brnpa")
  c.model.update(VARIANTS[a["variant"]])
  return common.finish(c, a)
