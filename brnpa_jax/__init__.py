"""brnpa_jax: BR-NPA (Bilinear Representative Non-Parametric Attention) in JAX.

The public API: the operator (``brnpa``, ``brnpa_single``, ``BRNPAOutput``),
the heads that put it and its baselines on a feature map (``BRNPAHead``,
``BCNNHead``, ``GAPHead``), the classifier and the model zoo
(``Classifier``, ``build_model``). Runs are restored with
``brnpa_jax.runs.load_run``.
"""

from brnpa_jax.attention.brnpa import BRNPAOutput, brnpa, brnpa_single
from brnpa_jax.models import (BCNNHead, BRNPAHead, Classifier, GAPHead,
                              build_model)

__all__ = ["BCNNHead", "BRNPAHead", "BRNPAOutput", "Classifier", "GAPHead",
           "brnpa", "brnpa_single", "build_model"]
__version__ = "0.2.0"
