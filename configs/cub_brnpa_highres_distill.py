r"""BR-NPA at high resolution (output stride 8) on CUB-200-2011, distilled
from the finished low-resolution run (docs/method.md#distillation).

First train the teacher (``configs/cub_brnpa_lowres.py``), then:

  python train.py \
      --config 'configs/cub_brnpa_highres_distill.py:init_from=weights/resnet50.npz' \
      --workdir runs/cub_brnpa_highres_distill

The teacher is read from ``runs/<name>_brnpa_lowres`` (``name`` is cub for
caltech_birds2011, else the dataset), or from ``teacher=<workdir>``; it must
have been trained on the same dataset. Loss:
``alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE``, with the middle
of the paper's search ranges as defaults: T=11 (of {1, 6, 11, 16, 21}) and
alpha=0.55 (of [0.1, 1.0]); switches ``temperature`` and ``alpha``.

Other switches: those of ``brnpa_jax/recipes/paper.py`` (``runlocal``: a smoke test;
the teacher must then be a runlocal run too).
"""

import ml_collections

from brnpa_jax.recipes import paper as common

TEMPERATURE = 11.0
ALPHA = 0.55


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse(arg, {"teacher": "", "temperature": TEMPERATURE,
                         "alpha": ALPHA}, drop=("res",))
  c = common.paper_config(a, head="brnpa", res="high")
  c.task = "distill"
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir=a["teacher"] or f"runs/{common.run_name(a['dataset'])}_brnpa_lowres",
      temperature=a["temperature"], alpha=a["alpha"]))
  return common.finish(c, a)
