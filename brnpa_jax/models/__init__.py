"""Backbones, heads and the classifier, built from a config by name."""

from brnpa_jax.models.classifier import AUX_HEAD_SLICES, Classifier
from brnpa_jax.models.heads import HEADS, BCNNHead, BRNPAHead, GAPHead
from brnpa_jax.models.registry import BACKBONES, STRIDES, build_model

__all__ = ["AUX_HEAD_SLICES", "BACKBONES", "BCNNHead", "BRNPAHead", "Classifier",
           "GAPHead", "HEADS", "STRIDES", "build_model"]
