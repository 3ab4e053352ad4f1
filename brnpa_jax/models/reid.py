"""The re-identification network: backbone -> head -> BN-neck -> ID classifier.

Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification" (2019): the pooled vector (here the K ranked BR-NPA vectors
concatenated, ``K*C``) is the embedding the triplet loss sees; a BatchNorm
without a learned shift (the "BN-neck") normalises it for the identity
classifier, a linear layer without bias. Retrieval uses the post-BN embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from brnpa_jax.models.registry import build_model


class ReIDNet(nn.Module):
  """Backbone + head (BR-NPA, bcnn or gap) + BN-neck + bias-free classifier.

  Attributes:
    backbone: images (B, H, W, 3) -> features (B, h, w, C).
    head: features -> ``(pooled (B, D), aux)``.
    num_classes: training identities.
    freeze_bn: the backbone's BatchNorm keeps its running statistics.
    dtype: computation dtype; embeddings and logits are float32.
  """
  backbone: nn.Module
  head: nn.Module
  num_classes: int
  freeze_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWx3, train: bool = False):
    """Returns ``(logits (B, num_classes), aux)``.

    aux holds the head's ``maps``, ``norms``, ``vectors`` (and ``indices``),
    ``features``, ``embedding`` (B, D) before the BN-neck (for the triplet
    loss) and ``embedding_bn`` (B, D) after it (for the classifier and for
    retrieval).
    """
    feats = self.backbone(images_BxHxWx3, train=train and not self.freeze_bn)
    pooled_BxD, aux = self.head(feats, train=train)
    embedding = pooled_BxD.astype(jnp.float32)
    # torch BatchNorm1d defaults; the shift stays 0 (Luo et al. freeze it).
    embedding_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                epsilon=1e-5, use_bias=False,
                                name="bnneck")(embedding)
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                      kernel_init=nn.initializers.normal(0.001),
                      name="classifier")(embedding_bn.astype(self.dtype))
    aux = dict(aux, features=feats, embedding=embedding,
               embedding_bn=embedding_bn)
    return logits.astype(jnp.float32), aux


def build_reid_model(model_cfg, num_classes: int, dtype: str = "float32") -> ReIDNet:
  """The re-id network a ``model`` config section describes.

  Backbone and head are those ``models.build_model`` makes from the same
  fields (``backbone``, ``res``, ``head``, ``num_maps``, ...); ``dropout`` and
  ``use_bias`` of its classifier are not used, and ``aux_heads`` must be off.
  """
  if model_cfg.get("aux_heads"):
    raise ValueError("aux_heads is a classification ablation; set "
                     "model.aux_heads=False for re-id.")
  clf = build_model(model_cfg, num_classes, dtype)
  return ReIDNet(backbone=clf.backbone, head=clf.head, num_classes=num_classes,
                 freeze_bn=clf.freeze_bn, dtype=clf.dtype)
