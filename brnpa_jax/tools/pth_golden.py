r"""Small ``.pth`` files written by PyTorch, for reading them without it.

``models/torch_pickle.py`` reads ``torch.save``'s files with numpy alone;
these files, written once by PyTorch itself, let the tests check it where
PyTorch is not installed (as in CI). Regenerate them (needs torch only):

  python -m brnpa_jax.tools.pth_golden --out tests/golden

- ``resnet_tiny.pth``: a training checkpoint, ``{'epoch', 'torch_version',
  'state_dict'}``, the state dict being ``weights_golden.random_state_dict(
  'resnet_tiny', 10, seed=1)`` with DataParallel's ``module.`` prefix, its
  tensors stored the ways PyTorch stores them: contiguous, a permuted view
  (non-contiguous strides), two tensors in one shared storage at offsets,
  an ``nn.Parameter``, 0-d int64 counters.
- ``vit_test_ema.pth``: ``{'state_dict_ema', 'torch_version'}`` in timm's
  layout of ``vit_test`` (``timm_golden.timm_shapes``); each tensor is one
  value broadcast to its shape (a one-element storage, stride 0), so the file
  stays small, stored in float32, float16, bfloat16 and float64 in turn
  (``vit_value``).
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from brnpa_jax import cli
from brnpa_jax.tools.timm_golden import timm_shapes
from brnpa_jax.tools.weights_golden import random_state_dict

RESNET_ARGS = dict(arch="resnet_tiny", num_classes=10, seed=1)
RESNET_EPOCH = 3
VIT_ARCH, VIT_CLASSES = "vit_test", 10
VIT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def resnet_state_dict() -> dict[str, np.ndarray]:
  """The values ``resnet_tiny.pth`` holds (without the ``module.`` prefix)."""
  return random_state_dict(**RESNET_ARGS)


def vit_value(i: int) -> tuple[float, str]:
  """The value and dtype of the i-th tensor of ``vit_test_ema.pth``; the
  values (multiples of 1/8 up to 16) are exact in every dtype."""
  return (i + 1) / 8, VIT_DTYPES[i % len(VIT_DTYPES)]


def vit_shapes() -> dict[str, tuple[int, ...]]:
  return timm_shapes(VIT_ARCH, VIT_CLASSES)


# -- generation (needs torch) ------------------------------------------------------
def _resnet_checkpoint(torch):
  sd = resnet_state_dict()
  out = {}
  for k, v in sd.items():
    t = torch.from_numpy(v)
    if k.endswith("conv1.weight"):  # non-contiguous: a permuted view
      t = torch.from_numpy(v.transpose(2, 3, 0, 1).copy()).permute(2, 3, 0, 1)
      assert not t.is_contiguous()
    out[k] = t
  # fc.weight and fc.bias in one storage: views at offsets 0 and numel.
  w, b = sd["fc.weight"], sd["fc.bias"]
  flat = torch.from_numpy(np.concatenate([w.ravel(), b]))
  out["fc.weight"], out["fc.bias"] = flat[:w.size].view(w.shape), flat[w.size:]
  out["bn1.weight"] = torch.nn.Parameter(out["bn1.weight"], requires_grad=True)
  return {"epoch": RESNET_EPOCH, "torch_version": str(torch.__version__),
          "state_dict": {f"module.{k}": t for k, t in out.items()}}


def _vit_checkpoint(torch):
  sd = {}
  for i, (k, shape) in enumerate(vit_shapes().items()):
    value, dtype = vit_value(i)
    sd[k] = torch.full((1,), value, dtype=getattr(torch, dtype)).expand(shape)
  return {"state_dict_ema": sd, "torch_version": str(torch.__version__)}


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("out", os.path.join("tests", "golden"),
                      "Folder for the golden files.", flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  import torch  # pylint: disable=g-import-not-at-top  # optional: regeneration only
  os.makedirs(fv.out, exist_ok=True)
  for name, obj in (("resnet_tiny.pth", _resnet_checkpoint(torch)),
                    ("vit_test_ema.pth", _vit_checkpoint(torch))):
    path = os.path.join(fv.out, name)
    torch.save(obj, path)
    print(f"{path}: {os.path.getsize(path)} bytes (torch {torch.__version__})")


def main(argv=None) -> int:
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.pth_golden")


if __name__ == "__main__":
  raise SystemExit(main())
