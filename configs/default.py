r"""BR-NPA on the embedded "parts" dataset: the default run, no download.

Launch (from the repository root):

  python train.py --config configs/default.py --workdir runs/default

Switches go after a colon, comma-separated; a bare switch means true:

  python train.py --config 'configs/default.py:head=bcnn' --workdir runs/bcnn
  python train.py --config 'configs/default.py:head=gap,res=low' --workdir runs/gap
  python train.py --config 'configs/default.py:k=5,refine=false,init=random' \
      --workdir runs/ablation
  python train.py --config 'configs/default.py:runlocal' --workdir /tmp/smoke

  python train.py --config 'configs/default.py:backbone=convnext_tiny,width=10' \
      --workdir runs/convnext
  python train.py --config 'configs/default.py:backbone=vit_tiny_patch16_224,width=22' \
      --workdir runs/vit

Switches: head (brnpa|bcnn|gap), backbone (resnet18|34|50|101|152, timm's
convnext_tiny|small|base|large, vit_/deit_tiny|small|base_patch16_224, and
the test presets resnet_tiny|convnext_test|vit_test), width (channels on the
ResNet scale: 64 = the published network, 16 = a quarter of its channels),
res (low: output stride 32, high: 8; for a ViT, low: its patch grid, high:
patches at half stride), k (number of maps), refine, init (norm|random),
aux_heads, dtype (float32|bfloat16), epochs, runlocal (tiny model of the
backbone's family, width 8 unless width= is given, and little data: seconds).
Any field can also be set with ``--config.<field>=<value>``; an unknown switch
or field is an error, and so is a value out of its range (checked before
anything is written; see docs/training.md).
"""

from brnpa_jax.recipes.embedded import CHOICES, SWITCHES, default_config

__all__ = ["CHOICES", "SWITCHES", "get_config"]


def get_config(arg: str | None = None):
  """The default config, adjusted by the ``arg`` switches."""
  return default_config(arg)
