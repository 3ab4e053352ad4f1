r"""Few-shot CUB-200-2011: ResNet-12 + BR-NPA, 100/50/50 classes (Chen et al. 2019).

Prepare the data once (tfds ``caltech_birds2011``; see the README), then run
the two phases in order (from the repository root):

  # 1. supervised pretraining on the 100 base classes
  python train.py --config 'configs/fewshot_cub.py' --workdir runs/fs_cub_pre
  # 2. episodic fine-tuning (5-way 5-shot, 15 queries) from its best state
  python train.py --config \
      'configs/fewshot_cub.py:phase=episodic,pretrain_workdir=runs/fs_cub_pre' \
      --workdir runs/fs_cub_epi

Both phases evaluate 600 5-way 1-shot and 5-shot episodes of the val classes
each epoch (selection: 5-way 1-shot, prototype classifier) and of the novel
classes at the end. Baselines and variants:

  python train.py --config 'configs/fewshot_cub.py:head=gap' --workdir runs/fs_cub_gap
  python train.py --config 'configs/fewshot_cub.py:res=low' --workdir runs/fs_cub_low
  python train.py --config 'configs/fewshot_cub.py:backbone=resnet18,width=64' \
      --workdir runs/fs_cub_r18
  python train.py --config 'configs/fewshot_cub.py:runlocal' --workdir /tmp/fs_smoke

High-resolution pretraining distilled from the low-resolution one (T=16,
alpha=0.4, docs/method.md#few-shot-classification; ``--config.distill.temperature=8`` and
``--config.distill.alpha=0.5`` for the other setting), then episodic as above:

  python train.py --config 'configs/fewshot_cub.py:res=low' --workdir runs/fs_cub_low
  python train.py --config 'configs/fewshot_cub.py:teacher=runs/fs_cub_low' \
      --workdir runs/fs_cub_pre_kd

Switches: backbone (resnet12|resnet12_narrow|resnet18|...), width (channels of
the first stage, 64), head (brnpa|gap|bcnn), res (low|high), k, phase
(pretrain|episodic), pretrain_workdir, ways/shots/queries (training episodes),
metric (euclidean|cosine), teacher (a low-resolution pretraining workdir to
distil from), size (input side, 84), epochs, dtype, runlocal (width 8, 32 px,
a few episodes: seconds; switches given explicitly keep their values).
"""

import ml_collections

from brnpa_jax.recipes.fewshot import fewshot_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CUB few-shot config, adjusted by the ``arg`` switches."""
  c, _ = fewshot_config(arg, name="caltech_birds2011", image_size=84,
                        resize_ratio=0.875, flip=True, pretrain_epochs=100,
                        episodic_epochs=20, pretrain_batch=64)
  c.lock()
  return c
