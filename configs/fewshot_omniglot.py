r"""Few-shot Omniglot: background set (964 characters) for pretraining, the
evaluation set split into val (329) and novel (330) characters.

tfds prepares ``omniglot`` itself on first use (it downloads the zips, so
run once with network access, or build it elsewhere and copy the directory).
The two phases, in order:

  python train.py --config 'configs/fewshot_omniglot.py' --workdir runs/fs_omni_pre
  python train.py --config \
      'configs/fewshot_omniglot.py:phase=episodic,pretrain_workdir=runs/fs_omni_pre' \
      --workdir runs/fs_omni_epi

Input 28 px by default (``size=84`` for the 84 px setting), strokes as 3
equal channels, no flips or crops. Switches as in ``configs/fewshot_cub.py``.

  python train.py --config 'configs/fewshot_omniglot.py:size=84,head=gap' \
      --workdir runs/fs_omni_gap84
  python train.py --config 'configs/fewshot_omniglot.py:runlocal' --workdir /tmp/fs_smoke
"""

import ml_collections

from brnpa_jax.recipes.fewshot import fewshot_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The Omniglot few-shot config, adjusted by the ``arg`` switches."""
  c, a = fewshot_config(arg, name="omniglot", image_size=28, resize_ratio=1.0,
                        flip=False, pretrain_epochs=30, episodic_epochs=10,
                        pretrain_batch=128)
  if a["runlocal"]:
    c.data.image_size = a["size"] or 28
  c.lock()
  return c
