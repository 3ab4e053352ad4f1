r"""Quantus 0.6.0's values (and seconds) on stored inputs: the reference side
of the golden tests and of ``benchmarks/xai.py``.

A standalone script for the reference environment (numpy, torch,
torchvision, quantus; no brnpa_jax, no jax), run as a subprocess by
``brnpa_jax.tools.xai_golden`` and ``benchmarks.xai``:

  /path/to/reference/python brnpa_jax/tools/quantus_reference.py IN.npz OUT.npz

``IN.npz`` holds the torchvision-layout ResNet's state dict (``sd/<key>``;
BasicBlocks, any widths), ``images`` (B, H, W, 3), ``maps`` (B, H, W),
``masks`` (B, H, W), optionally ``labels`` (B,) (default: the model's
predictions), and ``jobs``: a JSON list of ``{"name", "kind", "metric",
"kwargs", "seed", "call"}``. Kinds: ``quantus`` (a Quantus metric class
called with the maps, or with ``explain`` = the input gradient of the class
logit summed over channels as ``explain_func``), ``imputation``
(Quantus's imputation of one image's top pixels, without noise),
``road_pixels`` (ROAD's loop with Quantus's ``noisy_linear_imputation``,
pixels ranked by the map: Quantus 0.6.0's own ``ROAD`` raises an IndexError on 3-channel images, see
docs/explanations.md; each call's noise is seeded ``seed + 1000 * i + j``
for image i and percentage j) and ``quantus_road`` (the error Quantus's
ROAD gives). ``OUT.npz`` gets each job's values as ``<name>``, its seconds
as ``<name>/seconds``, the random draws of a job with ``"record":
"choice"`` or ``"uniform"`` (the subsets or noise Quantus drew) as
``<name>/draws``, the labels and the libraries' versions.
"""

import contextlib
import json
import sys
import time

import numpy as np


def build_model(torch, sd):
  """The torchvision ResNet layout (BasicBlocks) of the state dict's shapes,
  from torchvision's own blocks, loaded strictly."""
  from torch import nn
  from torchvision.models.resnet import BasicBlock

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      width = sd["conv1.weight"].shape[0]
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      inplanes = width
      for s in range(1, 5):
        blocks = []
        n = len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")})
        planes = sd[f"layer{s}.0.conv1.weight"].shape[0]
        for i in range(n):
          stride = 2 if (i == 0 and s > 1) else 1
          down = None
          if f"layer{s}.{i}.downsample.0.weight" in sd:
            down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride,
                                           bias=False), nn.BatchNorm2d(planes))
          blocks.append(BasicBlock(inplanes, planes, stride, down))
          inplanes = planes
        setattr(self, f"layer{s}", nn.Sequential(*blocks))
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.fc = nn.Linear(inplanes, sd["fc.weight"].shape[0])

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  model = Net()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                        strict=True)
  return model.eval()


def input_gradient(model, inputs, targets, **kwargs):
  """Gradient of the class logit w.r.t. the input, summed over channels."""
  import torch
  x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32).requires_grad_(True)
  t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
  model(x)[torch.arange(len(t)), t].sum().backward()
  return x.grad.sum(1, keepdim=True).numpy()


def road_pixels(model, torch, x, y, a, percentages, noise, seed, order="morf"):
  """ROAD with pixels ranked by the map and Quantus's imputation."""
  from quantus.functions.perturb_func import noisy_linear_imputation
  b, _, h, w = x.shape
  flat = a.reshape(b, -1)
  ordered = np.argsort(-flat if order == "morf" else flat, axis=1, kind="stable")
  out = np.zeros((b, len(percentages)))
  for j, p in enumerate(percentages):
    batch = []
    for i in range(b):
      np.random.seed(seed + 1000 * i + j)
      batch.append(noisy_linear_imputation(
          arr=x[i], indices=ordered[i, :int(h * w * p / 100)], noise=noise))
    with torch.no_grad():
      pred = model(torch.from_numpy(np.stack(batch).astype(np.float32)))
    out[:, j] = pred.argmax(-1).numpy() == y
  return out


@contextlib.contextmanager
def recorded(name):
  """Records every result of ``np.random.<name>`` while active."""
  draws = []
  if not name:
    yield draws
    return
  original = getattr(np.random, name)

  def wrapper(*args, **kwargs):
    draws.append(np.asarray(original(*args, **kwargs)))
    return draws[-1]

  setattr(np.random, name, wrapper)
  try:
    yield draws
  finally:
    setattr(np.random, name, original)


def main(argv):
  import torch
  import torchvision
  import quantus
  torch.set_grad_enabled(True)
  data = np.load(argv[1])
  sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
  model = build_model(torch, sd)
  x = np.ascontiguousarray(data["images"].transpose(0, 3, 1, 2)).astype(np.float32)
  with torch.no_grad():
    predicted = model(torch.from_numpy(x)).argmax(-1).numpy()
  y = data["labels"] if "labels" in data.files else predicted
  a = data["maps"][:, None].astype(np.float32)
  s = data["masks"][:, None].astype(np.float32)
  out = {"labels": y, "versions": np.array(json.dumps({
      "quantus": quantus.__version__, "torch": torch.__version__,
      "torchvision": torchvision.__version__, "numpy": np.__version__}))}
  for job in json.loads(str(data["jobs"])):
    t0 = time.perf_counter()
    if job["kind"] == "quantus":
      metric = getattr(quantus, job["metric"])(
          disable_warnings=True, display_progressbar=False, **job.get("kwargs", {}))
      call = dict(job.get("call", {}))
      call.setdefault("batch_size", len(x))  # one batch: the draws stack
      if call.pop("explain", False):
        call.update(explain_func=input_gradient, a_batch=None)
      else:
        call.setdefault("a_batch", a.copy())
      np.random.seed(job.get("seed", 0))
      with recorded(job.get("record")) as draws:
        values = metric(model, x.copy(), y, s_batch=s.copy(), device="cpu", **call)
      values = np.asarray(values, np.float64)
      if draws:  # the draws as Quantus made them (its stream is not simple)
        out[job["name"] + "/draws"] = np.stack(draws).astype(
            np.int16 if job["record"] == "choice" else np.float32)
    elif job["kind"] == "road_pixels":
      kw = job["kwargs"]
      values = road_pixels(model, torch, x, y, a, kw["percentages"], kw["noise"],
                           job.get("seed", 0), kw.get("order", "morf"))
    elif job["kind"] == "imputation":  # one image, the map's top pixels, no noise
      from quantus.functions.perturb_func import noisy_linear_imputation
      kw = job["kwargs"]
      i, (h, w) = kw["image"], x.shape[2:]
      order = np.argsort(-a[i].reshape(-1), kind="stable")
      values = noisy_linear_imputation(
          arr=x[i], indices=order[:int(h * w * kw["percent"] / 100)], noise=0.0)
    elif job["kind"] == "quantus_road":
      try:
        quantus.ROAD(disable_warnings=True, **job.get("kwargs", {}))(
            model, x.copy(), y, a_batch=a.copy(), device="cpu")
        values = np.array("no error")
      except Exception as e:  # pylint: disable=broad-except
        values = np.array(f"{type(e).__name__}: {e}")
    else:
      raise ValueError(f"unknown job kind {job['kind']!r}")
    out[job["name"]] = values
    out[job["name"] + "/seconds"] = np.array(time.perf_counter() - t0)
    print(f"{job['name']}: {time.perf_counter() - t0:.2f} s", flush=True)
  np.savez_compressed(argv[2], **out)


if __name__ == "__main__":
  main(sys.argv)
