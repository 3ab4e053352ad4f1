r"""Random torchvision-layout ResNet weights, and golden outputs from torchvision.

``random_state_dict`` draws a ResNet state dict in torchvision's key layout
from a numpy seed; the weight-import test and this script share it, so only
the small outputs are stored. Regenerate them (needs torch and torchvision):

  python -m brnpa_jax.tools.weights_golden --out tests/golden

For ResNet-18 and ResNet-50 it loads the weights into the real torchvision
model (strict), runs it in eval mode on ``golden_input()`` and writes
``resnet{18,50}.npz`` with the last stage's features (NHWC), the logits, and
the logits of the same weights with stages 3 and 4 at stride 1 (our
``res=high``).
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from brnpa_jax import cli
from brnpa_jax.models.registry import BACKBONES

GOLDEN_ARCHS = ("resnet18", "resnet50")
GOLDEN_SEED = 0
GOLDEN_CLASSES = 1000  # torchvision's default head
INPUT_SHAPE = (2, 64, 64, 3)  # NHWC


def golden_input(seed: int = GOLDEN_SEED) -> np.ndarray:
  """The (2, 64, 64, 3) float32 images the golden outputs were computed on."""
  return np.random.default_rng(seed + 1).normal(size=INPUT_SHAPE).astype(np.float32)


def torchvision_modules(arch: str):
  """``(name, kind, shape)`` of each layer in torchvision's order.

  ``kind`` is ``conv`` (shape OIHW), ``bn`` (shape (C,)) or ``fc`` (shape
  (classes, in) filled in by the caller).
  """
  kw = BACKBONES[arch].keywords
  block, stage_sizes, width = kw["block"], kw["stage_sizes"], kw.get("width", 64)
  bottleneck = block.expansion == 4
  layers = [("conv1", "conv", (width, 3, 7, 7)), ("bn1", "bn", (width,))]
  inplanes = width
  for s, n in enumerate(stage_sizes):
    planes = width * 2 ** s
    for i in range(n):
      p = f"layer{s + 1}.{i}."
      if bottleneck:
        convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
      else:
        convs = [(planes, inplanes, 3), (planes, planes, 3)]
      for j, (o, c, k) in enumerate(convs, 1):
        layers += [(f"{p}conv{j}", "conv", (o, c, k, k)), (f"{p}bn{j}", "bn", (o,))]
      out = planes * block.expansion
      if i == 0 and (inplanes != out or s > 0):
        layers += [(f"{p}downsample.0", "conv", (out, inplanes, 1, 1)),
                   (f"{p}downsample.1", "bn", (out,))]
      inplanes = out
  return layers, inplanes


def random_state_dict(arch: str, num_classes: int = GOLDEN_CLASSES,
                      seed: int = GOLDEN_SEED) -> dict[str, np.ndarray]:
  """A torchvision-layout state dict of random but well-scaled weights.

  Convs are He-initialised; BatchNorm gets random affine parameters and
  running statistics (the last BN of each residual branch a small scale, as
  in trained ResNets), so activations stay O(1) through ResNet-50 and every
  tensor matters to the output.

  Args:
    arch: a ``BACKBONES`` name.
    num_classes: rows of ``fc.weight``.
    seed: numpy seed; the same seed gives the same dict.

  Returns:
    torchvision key -> numpy array (float32; ``num_batches_tracked`` int64).
  """
  rng = np.random.default_rng(seed)
  layers, features = torchvision_modules(arch)
  sd = {}
  last_bn = {"bn2"} if BACKBONES[arch].keywords["block"].expansion == 1 else {"bn3"}
  for name, kind, shape in layers:
    if kind == "conv":
      fan_in = int(np.prod(shape[1:]))
      sd[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / fan_in), shape)
      continue
    residual_end = name.rsplit(".", 1)[-1] in last_bn or name.endswith("downsample.1")
    lo, hi = (0.1, 0.4) if residual_end else (0.5, 1.0)
    sd[f"{name}.weight"] = rng.uniform(lo, hi, shape)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, shape)
    sd[f"{name}.running_mean"] = rng.normal(0, 0.2, shape)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, shape)
    sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)
  sd["fc.weight"] = rng.normal(0, 1 / np.sqrt(features), (num_classes, features))
  sd["fc.bias"] = rng.normal(0, 0.1, (num_classes,))
  return {k: v if v.dtype == np.int64 else v.astype(np.float32)
          for k, v in sd.items()}


def _import_torchvision():
  """torchvision, also where its compiled ops do not match the installed torch
  (e.g. a CUDA torchvision wheel next to a CPU torch): the models are pure
  Python, only the import-time registration of two detection ops needs their
  schema, which is declared here if missing."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    return torch, torchvision
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
  lib = torch.library.Library("torchvision", "FRAGMENT")
  for op in ("nms", "qnms"):
    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  import sys  # pylint: disable=g-import-not-at-top
  for name in [m for m in sys.modules if m.startswith("torchvision")]:
    del sys.modules[name]
  import torchvision  # pylint: disable=g-import-not-at-top
  _import_torchvision.lib = lib  # keep the fragment alive
  return torch, torchvision


def torchvision_outputs(arch: str) -> dict[str, np.ndarray]:
  """The real torchvision model's outputs for ``random_state_dict(arch)``."""
  torch, torchvision = _import_torchvision()
  model = getattr(torchvision.models, arch)(weights=None)
  sd = random_state_dict(arch)
  ref = model.state_dict()
  assert sorted(sd) == sorted(ref), set(sd) ^ set(ref)
  for k, v in sd.items():
    assert tuple(v.shape) == tuple(ref[k].shape), (k, v.shape, ref[k].shape)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model.eval()
  x = torch.from_numpy(golden_input().transpose(0, 3, 1, 2).copy())

  def features(m):
    y = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(y))))

  with torch.no_grad():
    feats = features(model)
    logits = model.fc(torch.flatten(model.avgpool(feats), 1))
    assert torch.allclose(logits, model(x))
    for stage in (model.layer3, model.layer4):  # our res=high: stride 1 there
      first = stage[0]
      (first.conv2 if hasattr(first, "conv3") else first.conv1).stride = (1, 1)
      first.downsample[0].stride = (1, 1)
    logits_high = model(x)
  return {"features": feats.numpy().transpose(0, 2, 3, 1),
          "logits": logits.numpy(), "logits_high": logits_high.numpy(),
          "torchvision_version": np.array(torchvision.__version__)}


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("out", os.path.join("tests", "golden"),
                      "Folder for the golden files.", flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  os.makedirs(fv.out, exist_ok=True)
  for arch in GOLDEN_ARCHS:
    outputs = torchvision_outputs(arch)
    path = os.path.join(fv.out, f"{arch}.npz")
    np.savez_compressed(path, **outputs)
    print(f"{path}: features {outputs['features'].shape}, logits "
          f"{outputs['logits'].shape}, |features| max "
          f"{np.abs(outputs['features']).max():.3g}, |logits| max "
          f"{np.abs(outputs['logits']).max():.3g}")


def main(argv=None) -> int:
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.weights_golden")


if __name__ == "__main__":
  raise SystemExit(main())
