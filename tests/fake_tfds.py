"""Mocked TFDS fine-grained datasets with valid, known examples.

``tfds.testing.mock_data``'s own random examples do not fit these builders
(random boxes have ``ymin > ymax``; image and mask sizes differ), so
``mock_tfds`` serves H x W images, CUB masks and pet trimaps covering
``BOX``, and valid boxes.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

H, W = 40, 60  # CUB-like landscape images
BOX = (0.25, 0.5, 0.75, 1.0)  # ymin, xmin, ymax, xmax


def _fake_feature(feature, i):
  """A valid value of ``feature`` for example ``i`` (images H x W)."""
  if isinstance(feature, tfds.features.Image):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (H, W, feature.shape[-1]), dtype=np.uint8)
  if isinstance(feature, tfds.features.ClassLabel):
    return i % feature.num_classes
  if isinstance(feature, tfds.features.BBoxFeature):
    return tfds.features.BBox(*BOX)
  if isinstance(feature, tfds.features.Sequence):  # stanford_dogs: two dogs
    return {"bbox": [tfds.features.BBox(0.1, 0.2, 0.3, 0.4),
                     tfds.features.BBox(0.5, 0.1, 0.9, 0.3)]}
  if isinstance(feature, tfds.features.Text):
    return f"example_{i}"
  raise NotImplementedError(type(feature))


def _cub_mask():
  """255 on BOX, 100 (a minority of annotators) on a strip left of it."""
  mask = np.zeros((H, W, 1), np.uint8)
  mask[10:30, 30:60] = 255
  mask[10:30, 20:30] = 100
  return mask


def _pet_trimap():
  """Pet (1) on BOX with a 3 outline; background 2 elsewhere."""
  trimap = np.full((H, W, 1), 2, np.uint8)
  trimap[10:30, 30:60] = 3
  trimap[11:29, 31:59] = 1
  return trimap


def _fake_example(name, features, i):
  ex = {k: _fake_feature(f, i) for k, f in features.items()}
  if name == "caltech_birds2011":
    ex["segmentation_mask"] = _cub_mask()
  if name == "oxford_iiit_pet":
    ex["segmentation_mask"] = _pet_trimap()
  return ex


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False,
                num_examples=6, **kwargs):
  """A mocked ``_as_dataset``: valid examples (tfds' random boxes are not)."""
  del split, read_config, shuffle_files, kwargs
  features = self.info.features
  encoded = [features.encode_example(_fake_example(self.name, features, i))
             for i in range(num_examples)]
  signature = tf.nest.map_structure(
      lambda t: tf.TensorSpec(t.shape, t.tf_dtype), features.get_serialized_info())
  ds = tf.data.Dataset.from_generator(lambda: iter(encoded),
                                      output_signature=signature)
  ds = ds.apply(tf.data.experimental.assert_cardinality(num_examples))
  return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))


def mock_tfds(num_examples=6):
  def as_dataset(self, split, **kwargs):  # a function, so it binds as a method
    return _as_dataset(self, split, num_examples=num_examples, **kwargs)
  return tfds.testing.mock_data(num_examples=num_examples, as_dataset_fn=as_dataset)
