"""The re-identification network: backbone -> head -> BN-neck -> ID classifier.

Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification" (2019): the pooled vector (here the K ranked BR-NPA vectors
concatenated, ``K*C``) is the embedding the triplet loss sees; a BatchNorm
without a learned shift (the "BN-neck") normalises it for the identity
classifier, a linear layer without bias. Retrieval uses the post-BN embedding.

The training loss lives here too, beside the outputs it reads, as pure
functions with no data or TensorFlow dependency (benchmarks import them):
``reid_loss`` = cross-entropy with label smoothing on the logits + the
batch-hard triplet loss (Hermans et al. 2017) on the pre-BN embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

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


def squared_distances(a_NxD, b_MxD):
  """Squared Euclidean distances (N, M), clamped at 0 against rounding."""
  a = a_NxD.astype(jnp.float32)
  b = b_MxD.astype(jnp.float32)
  d = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
       - 2.0 * a @ b.T)
  return jnp.maximum(d, 0.0)


def batch_hard_triplet(emb_BxD, labels_B, margin: float = 0.3,
                       soft_margin: bool = False):
  """Batch-hard triplet loss (Hermans et al. 2017) with Euclidean distances.

  For every anchor: the farthest image of its identity (not itself) and the
  nearest image of another identity; the loss is
  ``max(d_ap - d_an + margin, 0)`` or, with ``soft_margin``,
  ``log(1 + exp(d_ap - d_an))``, averaged over anchors that have both a
  positive and a negative (0 when none has).

  Returns:
    ``(loss, fraction of anchors with a positive loss)``.
  """
  same = labels_B[:, None] == labels_B[None, :]
  not_self = ~jnp.eye(labels_B.shape[0], dtype=bool)
  pos, neg = same & not_self, ~same
  # The clamp keeps sqrt's gradient finite at 0 (identical embeddings).
  dist = jnp.sqrt(jnp.maximum(squared_distances(emb_BxD, emb_BxD), 1e-12))
  d_ap = jnp.max(jnp.where(pos, dist, -jnp.inf), axis=1)
  d_an = jnp.min(jnp.where(neg, dist, jnp.inf), axis=1)
  valid = jnp.any(pos, 1) & jnp.any(neg, 1)
  gap = jnp.where(valid, d_ap - d_an, 0.0)
  per_anchor = jax.nn.softplus(gap) if soft_margin else jax.nn.relu(gap + margin)
  count = jnp.maximum(jnp.sum(valid), 1)
  loss = jnp.sum(jnp.where(valid, per_anchor, 0.0)) / count
  active = jnp.sum(valid & (gap + (0.0 if soft_margin else margin) > 0)) / count
  return loss, active


def reid_loss(logits_BxN, aux, labels_B, *, label_smoothing: float = 0.1,
              margin: float = 0.3, soft_margin: bool = False,
              triplet_weight: float = 1.0):
  """ID loss on the logits + batch-hard triplet on ``aux['embedding']``.

  Returns:
    ``(loss, metrics)`` with ``loss``, ``ce``, ``triplet``,
    ``active_triplets`` and ``accuracy`` (batch means).
  """
  targets = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxN.shape[-1]),
                                label_smoothing)
  ce = jnp.mean(optax.softmax_cross_entropy(logits_BxN, targets))
  triplet, active = batch_hard_triplet(aux["embedding"], labels_B, margin,
                                       soft_margin)
  loss = ce + triplet_weight * triplet
  accuracy = jnp.mean((jnp.argmax(logits_BxN, -1) == labels_B).astype(jnp.float32))
  return loss, {"loss": loss, "ce": ce, "triplet": triplet,
                "active_triplets": active, "accuracy": accuracy}
