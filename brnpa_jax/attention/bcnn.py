"""The parametric attention baseline of the BR-NPA release ("B-CNN").

A residual basic block (C -> C) followed by a 1x1 convolution to K + 1
channels and a ReLU predicts attention maps; the first K maps weight the
features, and each weighted map is averaged over space. WS-DAN is the same
idea with 32 maps and a normalised pooled matrix. See ``SPEC.md`` section 2.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from brnpa_jax.models.resnet import BasicBlock, Conv


class BilinearAttention(nn.Module):
  """Learned attention maps and the vectors they pool.

  Attributes:
    num_maps: K, the number of maps used for pooling (K + 1 are predicted, as
      in the release; the last one is not used).
    dtype: computation dtype.
  """
  num_maps: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_BxHxWxC, train: bool):
    """Returns ``(vectors (B, K, C), maps (B, K, H, W) float32)``."""
    c = feats_BxHxWxC.shape[-1]
    y = BasicBlock(features=c, dtype=self.dtype, name="block")(feats_BxHxWxC, train)
    maps_BxHxWxK = nn.relu(Conv(self.num_maps + 1, (1, 1), dtype=self.dtype,
                                name="to_maps")(y))[..., :self.num_maps]
    # Mean over space of (map_k * F): one einsum, no (B, K, H, W, C) tensor.
    n = feats_BxHxWxC.shape[1] * feats_BxHxWxC.shape[2]
    vectors = jnp.einsum("bhwk,bhwc->bkc", maps_BxHxWxK, feats_BxHxWxC,
                         preferred_element_type=jnp.float32) / n
    maps = jnp.transpose(maps_BxHxWxK, (0, 3, 1, 2)).astype(jnp.float32)
    return vectors.astype(feats_BxHxWxC.dtype), maps
