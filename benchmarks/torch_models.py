"""PyTorch side of the benchmarks: ResNet + BR-NPA as the authors' release runs it.

Only for measuring; needs ``torch`` (``pip install -r requirements-bench.txt``).
The architecture is torchvision's ``resnet50`` (Bottleneck blocks, stride on
the 3x3 conv), written out here so the benchmarks need no torchvision, with
the same per-stage strides as ours (``strides=(1, 2, 1, 1)`` is the
high-resolution variant). The classifier pools with a pluggable function:
global average pooling or ``torch_brnpa``, the BR-NPA operator written the
way the release writes it (NCHW features). ``build_classifier`` joins them
as ``benchmarks.train_step`` builds ours. How the model is run (eager or
compiled, autocast, memory format, optimiser) is ``benchmarks.torch_peer``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

NORM_EPS = 1e-5


def device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def sync(out=None):
  """Waits for the GPU (a no-op on CPU) so that timings cover the work."""
  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return out


def torch_brnpa(feats_BxCxHxW, num_maps: int):
  """BR-NPA as the authors' release computes it, in PyTorch.

  Features stay NCHW; each round gathers the selected vector, forms the
  similarity map with a broadcast product summed over channels, and the
  refined vector with a map-weighted sum over space. Suppression multiplies
  the score. Same maths as ``brnpa_jax.brnpa``.

  Returns:
    (vectors (B, K, C), maps (B, K, H, W)).
  """
  b, _, _, w = feats_BxCxHxW.shape
  x = feats_BxCxHxW
  norm = torch.sqrt((x * x).sum(1)) + NORM_EPS  # (B, H, W)
  score = norm.clone()
  batch = torch.arange(b, device=x.device)
  vectors, maps = [], []
  for _ in range(num_maps):
    ind = score.flatten(1).argmax(1)
    row, col = ind // w, ind % w
    v = x[batch, :, row, col]  # (B, C)
    v_norm = norm[batch, row, col]
    sim = (x * v[:, :, None, None]).sum(1) / (norm * v_norm[:, None, None])
    a = sim / sim.sum((1, 2), keepdim=True)
    vectors.append((x * a[:, None]).sum((2, 3)))
    maps.append(a)
    score = (1 - sim) * score
  return torch.stack(vectors, 1), torch.stack(maps, 1)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, width: int, stride: int):
    super().__init__()
    out = width * self.expansion
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or cin != out:
      self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False),
                                      nn.BatchNorm2d(out))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  """torchvision's ResNet-50 trunk (no fc), configurable stage strides."""

  def __init__(self, stage_sizes: Sequence[int] = (3, 4, 6, 3),
               strides: Sequence[int] = (1, 2, 2, 2), width: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    layers, cin = [], width
    for i, (n, s) in enumerate(zip(stage_sizes, strides)):
      blocks = []
      for j in range(n):
        blocks.append(Bottleneck(cin, width * 2 ** i, s if j == 0 else 1))
        cin = width * 2 ** i * Bottleneck.expansion
      layers.append(nn.Sequential(*blocks))
    self.layers = nn.Sequential(*layers)
    self.num_features = cin

  def forward(self, x):
    return self.layers(self.maxpool(torch.relu(self.bn1(self.conv1(x)))))


class Classifier(nn.Module):
  """Backbone -> pooling (K vectors) -> linear, as our ``Classifier``."""

  def __init__(self, backbone: ResNet, pool: Callable[[torch.Tensor], torch.Tensor],
               num_vectors: int, num_classes: int):
    super().__init__()
    self.backbone, self.pool = backbone, pool
    self.fc = nn.Linear(backbone.num_features * num_vectors, num_classes)

  def forward(self, x):
    return self.fc(self.pool(self.backbone(x)).flatten(1))


def gap_pool(feats_NCHW: torch.Tensor) -> torch.Tensor:
  return feats_NCHW.mean((2, 3))[:, None]


def brnpa_pool(num_maps: int) -> Callable[[torch.Tensor], torch.Tensor]:
  """BR-NPA vectors in float32 whatever the autocast dtype of the features
  (ours computes the similarities in float32 too)."""
  return lambda feats_NCHW: torch_brnpa(feats_NCHW.float(), num_maps)[0]


def build_classifier(head: str, strides: Sequence[int], num_classes: int, *,
                     num_maps: int = 3, stage_sizes: Sequence[int] = (3, 4, 6, 3),
                     width: int = 64) -> Classifier:
  """ResNet (``stage_sizes``, ``width``) + ``head`` (brnpa or gap) + linear."""
  if head not in ("brnpa", "gap"):
    raise ValueError(f"the PyTorch model has heads brnpa and gap; got {head!r}.")
  pool = brnpa_pool(num_maps) if head == "brnpa" else gap_pool
  backbone = ResNet(stage_sizes=stage_sizes, strides=strides, width=width)
  return Classifier(backbone, pool, num_maps if head == "brnpa" else 1,
                    num_classes)
