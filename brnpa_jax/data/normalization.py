"""Input normalisation constants and sizes, free of TensorFlow.

Shared by the tf.data transforms and by code that runs without TensorFlow
(numpy data paths, benchmarks on machines that have only jax).
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(size: int, resize_ratio: float) -> int:
  """The short side before cropping (torchvision's ``int(size / ratio)``)."""
  return int(size / resize_ratio + 1e-6)  # 448 / 0.875 is exactly 512
