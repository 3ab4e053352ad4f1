"""The classifier: backbone -> head -> dropout -> linear, returning (logits, aux)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from brnpa_jax.models.blocks import LayerNorm

# The auxiliary-heads ablation (K = 3): which ranked vectors each extra head
# sees, by 0-based rank.
AUX_HEAD_SLICES = {"v12": (0, 1), "v23": (1, 2), "v1": (0,), "v2": (1,), "v3": (2,)}


class Classifier(nn.Module):
  """Joins a backbone and a head.

  Attributes:
    backbone: module mapping images (B, H, W, 3) to features (B, h, w, C).
    head: module mapping features to ``(pooled (B, D), aux)``.
    num_classes: number of output classes.
    dropout: dropout rate on the pooled vector.
    use_bias: bias of the final linear layer.
    aux_heads: add the five auxiliary heads on stop-gradient slices of the
      concatenated BR-NPA vector (needs K = 3); their logits are in
      ``aux['aux_logits']``.
    freeze_bn: the backbone's BatchNorm uses its running statistics in
      training too and does not update them (fine-tuning with small batches;
      makes gradient accumulation exactly equal to the large batch).
    dtype: computation dtype; logits are returned in float32.
  """
  backbone: nn.Module
  head: nn.Module
  num_classes: int
  dropout: float = 0.0
  use_bias: bool = True
  aux_heads: bool = False
  freeze_bn: bool = False
  dtype: Any = jnp.float32

  def __call__(self, images_BxHxWx3, train: bool = False):
    """Returns ``(logits (B, num_classes) float32, aux)``.

    aux holds ``features`` (B, h, w, C), ``maps`` (B, K, h, w), ``norms``
    (B, h, w), ``vectors`` (B, K, C), ``embedding`` (B, D) (the head's pooled
    vector before dropout and the linear layer; D = K*C for BR-NPA and B-CNN)
    and, for BR-NPA, ``indices`` (B, K).
    """
    return self.classify_features(self.features(images_BxHxWx3, train=train),
                                  train=train)

  def features(self, images_BxHxWx3, train: bool = False):
    """The backbone alone: images (B, H, W, 3) -> features (B, h, w, C).

    With ``classify_features`` it splits ``__call__`` at the last feature map
    (what CAM explainers differentiate or perturb); use it through
    ``model.apply(variables, images, method=Classifier.features)``.
    """
    return self.backbone(images_BxHxWx3, train=train and not self.freeze_bn)

  @nn.compact
  def classify_features(self, feats_BxHxWxC, train: bool = False):
    """Head, dropout and the linear layer(s): features -> ``(logits, aux)``.

    ``__call__(x)`` equals ``classify_features(features(x))``; aux is as in
    ``__call__`` (its ``features`` are the given ones). Backbones with
    ``pooled_norm`` (ConvNeXt) get a LayerNorm (``head_norm``) on each of
    the head's vectors before dropout and the linear layer, as timm's head
    normalises its pooled vector.
    """
    feats = feats_BxHxWxC
    pooled, aux = self.head(feats, train=train)
    if getattr(self.backbone, "pooled_norm", False):
      # The family's own norm of the pooled vector (timm ConvNeXt's
      # head.norm), applied to each of the head's K vectors.
      vectors = LayerNorm(dtype=self.dtype, name="head_norm")(aux["vectors"])
      pooled = vectors.reshape(vectors.shape[0], -1)
    aux = dict(aux, features=feats, embedding=pooled)
    pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    # The family's own init of its classifier (timm's std 0.02 for ConvNeXt
    # and ViT), else Flax's default (the ResNets keep theirs).
    kernel_init = getattr(self.backbone, "classifier_init",
                          nn.linear.default_kernel_init)
    dense: Callable[..., nn.Module] = lambda name: nn.Dense(
        self.num_classes, use_bias=self.use_bias, dtype=self.dtype,
        kernel_init=kernel_init, name=name)
    logits = dense("classifier")(pooled).astype(jnp.float32)
    if self.aux_heads:
      vectors = aux["vectors"]
      if vectors.shape[1] != 3:
        raise ValueError("aux_heads is the K=3 ablation; got K="
                         f"{vectors.shape[1]}. Set num_maps=3 or aux_heads=False.")
      c = vectors.shape[-1]
      frozen = jax.lax.stop_gradient(pooled)
      aux["aux_logits"] = {
          name: dense(f"aux_{name}")(
              jnp.concatenate([frozen[:, r * c:(r + 1) * c] for r in ranks], -1)
          ).astype(jnp.float32)
          for name, ranks in AUX_HEAD_SLICES.items()
      }
    return logits, aux


INFERENCE_OUTPUTS = ("probs", "maps", "norms")


def make_infer_fn(model: nn.Module) -> Callable:
  """``infer(variables, images) -> {'probs', 'maps', 'norms'}`` (float32).

  The inference function of any model that returns ``(logits, aux)`` with
  ``maps`` and ``norms`` in aux: what batch prediction, export and the
  end-of-run pictures run.
  """

  def infer(variables, images_BxHxWx3):
    logits, aux = model.apply(variables, images_BxHxWx3, train=False)
    return {"probs": jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
            "maps": aux["maps"].astype(jnp.float32),
            "norms": aux["norms"].astype(jnp.float32)}

  return infer
