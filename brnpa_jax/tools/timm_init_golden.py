r"""timm's initialisation of ConvNeXt and ViT, as per-parameter statistics.

``tests/test_timm.py`` checks that our freshly initialised ConvNeXt and ViT
draw every parameter as timm does (standard deviation, mean, and the bounds
of uniform draws) against the numbers this script writes, so the test needs
neither PyTorch nor timm. Regenerate (needs torch and timm):

  python -m brnpa_jax.tools.timm_init_golden --out tests/golden

For each case of ``CASES`` it builds timm's model of that architecture
(``timm.create_model`` with the case's arguments, its own initialisation) under
``NUM_DRAWS`` torch seeds and pools each parameter's values over the draws:
``timm_init_stats.json`` holds, per timm key, the shape and the pooled mean,
standard deviation and largest magnitude, with the torch and timm versions.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from absl import flags

from brnpa_jax import cli

NUM_DRAWS = 8
NUM_CLASSES = 10
# case -> (our preset at width 64, timm.create_model name, its arguments).
# The presets' tensors are large enough (>= 3,072 values, but biases and
# per-channel vectors) for a sample standard deviation within a few percent.
CASES = {
    "convnext": ("convnext_test", "convnext_tiny",
                 dict(depths=(1, 1, 1, 1), dims=(64, 128, 256, 512))),
    "vit": ("vit_test", "vit_tiny_patch16_224",
            dict(patch_size=8, img_size=64, embed_dim=256, depth=2, num_heads=4,
                 global_pool="avg", fc_norm=False)),
}


def timm_init_stats(name: str, kwargs: dict) -> dict[str, dict]:
  """Per-key statistics of timm's initialisation, pooled over ``NUM_DRAWS``."""
  import timm  # pylint: disable=g-import-not-at-top  # optional: regeneration only
  import torch  # pylint: disable=g-import-not-at-top
  draws = []
  for seed in range(NUM_DRAWS):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES,
                              **kwargs)
    draws.append({k: v.detach().double().numpy() for k, v in
                  model.state_dict().items()})
  out = {}
  for key, value in draws[0].items():
    pooled = np.stack([d[key] for d in draws])
    out[key] = {"shape": list(value.shape), "mean": float(pooled.mean()),
                "std": float(pooled.std()),
                "max_abs": float(np.abs(pooled).max())}
  return out


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("out", os.path.join("tests", "golden"),
                      "Folder for the golden file.", flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  import timm  # pylint: disable=g-import-not-at-top  # optional: regeneration only
  import torch  # pylint: disable=g-import-not-at-top
  golden = {"versions": {"timm": timm.__version__, "torch": torch.__version__},
            "num_draws": NUM_DRAWS, "num_classes": NUM_CLASSES, "cases": {}}
  for case, (preset, name, kwargs) in CASES.items():
    golden["cases"][case] = {"preset": preset, "timm_model": name,
                             "timm_kwargs": kwargs,
                             "params": timm_init_stats(name, kwargs)}
  os.makedirs(fv.out, exist_ok=True)
  path = os.path.join(fv.out, "timm_init_stats.json")
  text = re.sub(r'\{\s*"shape"[^}]*\}',  # one line per parameter
                lambda m: json.dumps(json.loads(m.group(0))),
                json.dumps(golden, indent=1))
  with open(path, "w") as f:
    f.write(text + "\n")
  counts = ", ".join(f"{case} ({len(v['params'])} keys)"
                     for case, v in golden["cases"].items())
  print(f"{path}: {counts}; timm {timm.__version__}, torch {torch.__version__}")


def main(argv=None) -> int:
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.timm_init_golden")


if __name__ == "__main__":
  raise SystemExit(main())
