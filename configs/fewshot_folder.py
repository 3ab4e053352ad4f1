r"""Few-shot on any image folder: ``root/{train,val,test}/<class>/<images>``.

mini-ImageNet (Ravi & Larochelle split: 64/16/20 classes), tieredImageNet
(351/97/160) and CIFAR-FS (64/16/20) in this layout; ``root`` is required:

  python train.py --config 'configs/fewshot_folder.py:root=/data/mini_imagenet' \
      --workdir runs/fs_mini_pre
  python train.py --config \
      'configs/fewshot_folder.py:root=/data/mini_imagenet,phase=episodic,pretrain_workdir=runs/fs_mini_pre' \
      --workdir runs/fs_mini_epi

``size`` sets the input side (84 for mini/tieredImageNet, 32 for CIFAR-FS).
Other split folder names: ``--config.data.folder.splits='("base","val","novel")'``.
Switches as in ``configs/fewshot_cub.py``, plus root.
"""

import ml_collections

from brnpa_jax.recipes.fewshot import fewshot_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The image-folder few-shot config, adjusted by the ``arg`` switches."""
  c, a = fewshot_config(arg, name="folder", image_size=84, resize_ratio=0.875,
                        flip=True, pretrain_epochs=90, episodic_epochs=20,
                        pretrain_batch=128, extra_switches={"root": ""})
  c.data.folder.root = a["root"]
  c.lock()
  return c
