"""Backbones, heads and the classifier, built from a config by name."""

from brnpa_jax.models.classifier import AUX_HEAD_SLICES, Classifier
from brnpa_jax.models.heads import HEADS
from brnpa_jax.models.registry import build_model
from brnpa_jax.models.resnet import BACKBONES, STRIDES

__all__ = ["AUX_HEAD_SLICES", "BACKBONES", "Classifier", "HEADS", "STRIDES",
           "build_model"]
