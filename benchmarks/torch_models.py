"""PyTorch side of the benchmarks: a ResNet in torchvision's layout (v1.5).

Only for measuring; needs ``torch`` (``pip install -r requirements-bench.txt``).
The architecture is torchvision's ``resnet50`` (Bottleneck blocks, stride on
the 3x3 conv), written out here so the benchmarks need no torchvision, with
the same per-stage strides as ours (``strides=(1, 2, 1, 1)`` is the
high-resolution variant). The classifier pools with a pluggable function:
global average pooling or a BR-NPA operator taking NCHW features.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


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
