"""Datasets and input pipelines.

- ``parts``: the procedural fine-grained "parts" dataset (pure numpy).
- ``parts_tfds``: its TFDS builder, ``brnpa_parts``.
- ``transforms``: per-example TensorFlow augmentation shared by all datasets.
- ``input_pipeline``: the tf.data API the trainer calls.

Nothing is imported here, so ``parts`` can be used without TensorFlow.
"""
