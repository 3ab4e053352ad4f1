"""Datasets and input pipelines.

- ``parts``: the procedural fine-grained "parts" dataset (pure numpy).
- ``parts_tfds``: its TFDS builder, ``brnpa_parts``.
- ``tfds_datasets``: reading TFDS builders; the fine-grained datasets
  (CUB-200-2011, Cars196, Stanford Dogs, Flowers-102, Oxford-IIIT Pet).
- ``image_folder``: one sub-folder per class, as torchvision reads them.
- ``transforms``: per-example TensorFlow augmentation shared by all datasets.
- ``input_pipeline``: the tf.data API the trainer calls.

Nothing is imported here, so ``parts`` can be used without TensorFlow.
"""
