"""Input normalisation constants and sizes, free of TensorFlow.

Shared by the tf.data transforms and by code that runs without TensorFlow
(numpy data paths, benchmarks on machines that have only jax).
"""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(size: int, resize_ratio: float) -> int:
  """The short side before cropping (torchvision's ``int(size / ratio)``)."""
  return int(size / resize_ratio + 1e-6)  # 448 / 0.875 is exactly 512


def normalize(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 RGB -> ImageNet-normalised float32 (numpy twin of
  ``transforms.normalize``)."""
  x = images_uint8.astype(np.float32) / 255.0
  return (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def denormalize(image: np.ndarray) -> np.ndarray:
  """Inverse of ``normalize`` for display: (..., 3) float -> uint8.

  Args:
    image: normalised image(s), channels last, any leading dimensions.

  Returns:
    uint8 array of the same shape.
  """
  std, mean = np.float32(IMAGENET_STD), np.float32(IMAGENET_MEAN)
  x = np.asarray(image, np.float32) * std + mean
  return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
