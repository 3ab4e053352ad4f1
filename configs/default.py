r"""BR-NPA on the embedded "parts" dataset: the default run, no download.

Launch (from the repository root):

  python train.py --config configs/default.py --workdir runs/default

Switches go after a colon, comma-separated; a bare switch means true:

  python train.py --config 'configs/default.py:head=bcnn' --workdir runs/bcnn
  python train.py --config 'configs/default.py:head=gap,res=low' --workdir runs/gap
  python train.py --config 'configs/default.py:k=5,refine=false,init=random' \
      --workdir runs/ablation
  python train.py --config 'configs/default.py:runlocal' --workdir /tmp/smoke

Switches: head (brnpa|bcnn|gap), backbone (resnet18|34|50|101|152|resnet_tiny),
width (channels of the first stage), res (low: output stride 32, high: 8),
k (number of maps), refine, init (norm|random), aux_heads, dtype
(float32|bfloat16), epochs, runlocal (tiny model and data, seconds). Any field
can also be set with ``--config.<field>=<value>``; an unknown switch or field
is an error.
"""

from brnpa_jax.recipes.embedded import CHOICES, SWITCHES, default_config

__all__ = ["CHOICES", "SWITCHES", "get_config"]


def get_config(arg: str | None = None):
  """The default config, adjusted by the ``arg`` switches."""
  return default_config(arg)
