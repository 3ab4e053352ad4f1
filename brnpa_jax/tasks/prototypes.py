"""The prototype classifier of few-shot learning (Snell et al. 2017), pure.

Per episode: class prototypes are the means of the support embeddings, and a
query's logits are the negative squared Euclidean distances (or scaled
cosine similarities) to them. No data, no runs: the few-shot task and the
benchmarks share these functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from brnpa_jax.choices import FEWSHOT_METRICS as METRICS

_EPS = 1e-12


# -- the prototype classifier (pure, per episode) ----------------------------


def _l2_normalize(x, axis=-1):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis, keepdims=True) + _EPS)


def prototype_logits(support_SxD, support_labels_S, query_QxD, ways: int,
                     metric: str = "euclidean", scale: float = 1.0):
  """Logits of the queries against the class prototypes of one episode.

  Args:
    support_SxD: support embeddings.
    support_labels_S: their episode labels in ``0..ways-1``.
    query_QxD: query embeddings.
    ways: N.
    metric: ``euclidean``: ``-||q - p_n||^2`` with ``p_n`` the mean support
      embedding of class n; ``cosine``: ``scale * cos(q, p_n)`` with ``p_n``
      the mean of the L2-normalised support embeddings.
    scale: multiplies the logits (the cosine classifier's temperature).

  Returns:
    float32 (Q, N) logits.
  """
  if metric not in METRICS:
    raise ValueError(f"Unknown metric {metric!r}; valid: {METRICS}.")
  support = support_SxD.astype(jnp.float32)
  query = query_QxD.astype(jnp.float32)
  if metric == "cosine":
    support, query = _l2_normalize(support), _l2_normalize(query)
  onehot_SxN = jax.nn.one_hot(support_labels_S, ways, dtype=jnp.float32)
  counts_N = jnp.maximum(jnp.sum(onehot_SxN, 0), 1.0)
  protos_NxD = (onehot_SxN.T @ support) / counts_N[:, None]
  if metric == "cosine":
    return scale * (query @ _l2_normalize(protos_NxD).T)
  diff = query[:, None, :] - protos_NxD[None, :, :]
  return -scale * jnp.sum(diff * diff, -1)


def prototypical_loss(embeddings_BxD, labels_B, *, ways: int, shots: int,
                      queries: int, metric: str = "euclidean",
                      scale: float = 1.0):
  """Mean query cross-entropy and accuracy over the episodes of a batch.

  Args:
    embeddings_BxD: rows in ``episode_layout`` order, episode after episode.
    labels_B: episode labels of the rows.
    ways, shots, queries: the episodes' N, K, Q.
    metric, scale: as in ``prototype_logits``.

  Returns:
    ``(loss, accuracy)`` scalars.
  """
  rows = ways * (shots + queries)
  b, d = embeddings_BxD.shape
  if b % rows:
    raise ValueError(f"A batch of {b} rows is not whole {ways}-way {shots}-shot "
                     f"{queries}-query episodes of {rows} rows; set batch_size "
                     f"to a multiple of {rows}.")
  emb = embeddings_BxD.reshape(b // rows, rows, d)
  labels = labels_B.reshape(b // rows, rows)
  s = ways * shots
  logits = jax.vmap(functools.partial(
      prototype_logits, ways=ways, metric=metric, scale=scale))(
          emb[:, :s], labels[:, :s], emb[:, s:])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, s:])
  correct = jnp.argmax(logits, -1) == labels[:, s:]
  return jnp.mean(ce), jnp.mean(correct.astype(jnp.float32))


@jax.jit
def episode_accuracies(embeddings_NxD, support_ExWxK, query_ExWxQ):
  """Per-episode query accuracy of the prototype and the cosine classifier.

  Args:
    embeddings_NxD: embeddings of a whole split.
    support_ExWxK: support image indices of E episodes (W ways, K shots).
    query_ExWxQ: query image indices.

  Returns:
    ``(prototype (E,), cosine (E,))`` accuracies in [0, 1].
  """
  _, ways, shots = support_ExWxK.shape
  queries = query_ExWxQ.shape[-1]
  s_labels = jnp.repeat(jnp.arange(ways), shots)
  q_labels = jnp.repeat(jnp.arange(ways), queries)

  def one(support_WxK, query_WxQ):
    support = embeddings_NxD[support_WxK.reshape(-1)]
    query = embeddings_NxD[query_WxQ.reshape(-1)]
    accs = []
    for metric in METRICS:
      logits = prototype_logits(support, s_labels, query, ways, metric)
      accs.append(jnp.mean((jnp.argmax(logits, -1) == q_labels)
                           .astype(jnp.float32)))
    return tuple(accs)

  return jax.vmap(one)(support_ExWxK, query_ExWxQ)
