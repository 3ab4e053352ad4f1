"""brnpa_jax: BR-NPA (Bilinear Representative Non-Parametric Attention) in JAX."""

from brnpa_jax.attention.brnpa import BRNPAOutput, brnpa, brnpa_single

__all__ = ["BRNPAOutput", "brnpa", "brnpa_single"]
__version__ = "0.1.0"
