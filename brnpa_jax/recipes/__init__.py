"""What the config files share: switch parsing aside (``config_args``), the
paper's recipe for fine-grained classification (``paper``) and the few-shot
recipe (``fewshot``).

They live in the package, not beside the config files, so that a config
file loads from any directory once ``brnpa_jax`` is installed; none of them
imports TensorFlow.
"""
