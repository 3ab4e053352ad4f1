"""Person re-identification: P x K batches, ID + triplet loss, CMC and mAP.

Training (Luo et al. 2019, "Bag of Tricks"; ``models.reid.reid_loss``):
cross-entropy with label smoothing on the post-BN-neck logits plus the
batch-hard triplet loss (Hermans et al. 2017) on the pre-BN embedding, on
identity-balanced P x K batches (``data.reid``). Evaluation follows the
Market-1501 protocol: every query ranks the gallery by Euclidean distance
between L2-normalised post-BN embeddings; gallery images of the query's
identity seen by the query's camera, and junk images (identity -1), are
left out of its ranking; CMC rank-k is the share of queries whose first
true match is in the top k, mAP the mean over queries of the average
precision (the area under the non-interpolated precision-recall curve, as
torchreid and the Bag-of-Tricks code compute it). Queries without any
valid match are skipped. The best model is chosen by rank-1 (docs/method.md#person-re-identification).

Metrics are computed in jitted blocks of queries: a block sorts its
(block, G) distances and reduces them to AP and first-hit rank, so memory
stays O(block x G) for any query count (3,368 x 15,913 on Market-1501).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax.data import reid as reid_data
from brnpa_jax.data.generators import as_tf_dataset
from brnpa_jax.data.normalization import denormalize
from brnpa_jax.models.reid import build_reid_model, reid_loss, squared_distances
from brnpa_jax.tasks.base import RunContext, Task, Visual

RANKS = (1, 5, 10)


# -- retrieval metrics -----------------------------------------------------------
def _block_metrics(q_emb, q_ids, q_cams, g_emb, g_ids, g_cams):
  """AP, first-hit rank (G if none) and validity for a block of queries."""
  dist = squared_distances(q_emb, g_emb)          # same order as Euclidean
  order = jnp.argsort(dist, axis=1, stable=True)  # ties: gallery order
  ids, cams = g_ids[order], g_cams[order]
  match = ids == q_ids[:, None]
  junk = (ids == reid_data.JUNK) | (match & (cams == q_cams[:, None]))
  keep = ~junk
  good = match & keep
  position = jnp.cumsum(keep, axis=1) - 1          # rank among kept images
  hits = jnp.cumsum(good, axis=1)
  n_good = hits[:, -1]
  precision = hits / (position + 1.0)
  ap = jnp.sum(jnp.where(good, precision, 0.0), 1) / jnp.maximum(n_good, 1)
  first = jnp.min(jnp.where(good, position, g_ids.shape[0]), axis=1)
  return ap, first, n_good > 0


_block_metrics_jit = jax.jit(_block_metrics)


def retrieval_metrics(q_emb, q_ids, q_cams, g_emb, g_ids, g_cams, *,
                      block_size: int = 256, ranks=RANKS) -> dict[str, float]:
  """CMC rank-k and mAP of queries against a gallery (Market-1501 protocol).

  Args:
    q_emb: (Q, D) query embeddings; q_ids, q_cams: (Q,) identities, cameras.
    g_emb: (G, D) gallery embeddings; g_ids, g_cams: (G,); identity -1 is junk.
    block_size: queries per jitted block (the last block is padded).
    ranks: the CMC ranks to report.

  Returns:
    ``rank{k}`` for each k, ``mAP`` and ``num_valid_queries``.
  """
  q_emb = np.asarray(q_emb, np.float32)
  q_ids, q_cams = np.asarray(q_ids, np.int32), np.asarray(q_cams, np.int32)
  gallery = (jnp.asarray(g_emb, jnp.float32), jnp.asarray(g_ids, jnp.int32),
             jnp.asarray(g_cams, jnp.int32))
  n = len(q_ids)
  aps, firsts, valids = [], [], []
  for start in range(0, n, block_size):
    real = min(block_size, n - start)
    pad = block_size - real
    block = [np.pad(x[start:start + real], [(0, pad)] + [(0, 0)] * (x.ndim - 1),
                    constant_values=c)
             for x, c in ((q_emb, 0), (q_ids, -2), (q_cams, -2))]
    ap, first, valid = jax.device_get(_block_metrics_jit(*block, *gallery))
    aps.append(ap[:real])
    firsts.append(first[:real])
    valids.append(valid[:real])
  ap, first, valid = (np.concatenate(x) for x in (aps, firsts, valids))
  num_valid = int(valid.sum())
  out = {f"rank{k}": float(np.mean(first[valid] < k)) if num_valid else 0.0
         for k in ranks}
  out["mAP"] = float(np.mean(ap[valid])) if num_valid else 0.0
  out["num_valid_queries"] = float(num_valid)
  return out


def l2_normalize(x, eps: float = 1e-12):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


# -- the task ------------------------------------------------------------------
class ReIDTask(Task):
  """Market-1501 / DukeMTMC-reID training and retrieval evaluation.

  Reads ``config.data`` (``name``, ``data_dir``, ``height``, ``width``,
  ``ids_per_batch`` P, ``images_per_id`` K, augmentation switches,
  ``val_identities``) and ``config.reid`` (``triplet_margin``,
  ``soft_margin``, ``triplet_weight``, ``eval_block_size``,
  ``num_retrieved``); ``config.label_smoothing`` for the ID loss.
  """

  selection_metric = "rank1"

  def __init__(self, config):
    super().__init__(config)
    self._data = None
    self._fns = {}
    self._cache = {}

  @property
  def data(self) -> reid_data.ReIDData:
    if self._data is None:
      self._data = reid_data.load(self.config.data)
    return self._data

  # -- data --------------------------------------------------------------------
  def prepare_data(self) -> None:
    _ = self.data  # reading the file lists checks the folder layout

  def num_classes(self) -> int:
    return self.data.num_identities

  def class_names(self) -> list[str] | None:
    return None  # training identities: retrieval does not output them

  def _pk(self) -> tuple[int, int]:
    d = self.config.data
    p, k = d.ids_per_batch, d.images_per_id
    if p * k != self.config.batch_size:
      raise ValueError(f"batch_size={self.config.batch_size} must equal "
                       f"data.ids_per_batch x data.images_per_id = {p} x {k}.")
    accum = self.config.get("grad_accum_steps", 1)
    if k % accum or k // accum < 2:
      raise ValueError(f"grad_accum_steps={accum} must divide images_per_id={k} "
                       "and leave at least 2 images of each identity per "
                       "micro-batch (the triplet loss needs positives).")
    return p, k

  def num_train_examples(self) -> int:
    p, k = self._pk()
    return reid_data.epoch_batches(self.data.labels, p, k) * p * k

  def train_dataset(self, *, batch_size: int, seed: int, epoch: int,
                    process_index: int, process_count: int):
    p, k = self._pk()
    if batch_size * process_count != p * k:
      raise ValueError(f"per-process batch {batch_size} x {process_count} "
                       f"processes != P x K = {p * k}.")
    d = self.config.data
    train = self.data.train
    gen = lambda: reid_data.train_batches(
        train.paths, self.data.labels, d, p=p, k=k, seed=seed, epoch=epoch,
        process_index=process_index, process_count=process_count)
    return as_tf_dataset(gen, {
        "image": ((batch_size, d.height, d.width, 3), np.float32),
        "label": ((batch_size,), np.int32)})

  def eval_splits(self) -> list[str]:
    return list(self.data.evals)

  # -- model and loss ------------------------------------------------------------
  def build_model(self, num_classes: int):
    return build_reid_model(self.config.model, num_classes, self.config.dtype)

  def loss_and_metrics(self, logits, aux, batch, context):
    del context
    r = self.config.reid
    return reid_loss(logits, aux, batch["label"],
                     label_smoothing=self.config.get("label_smoothing", 0.1),
                     margin=r.triplet_margin, soft_margin=r.soft_margin,
                     triplet_weight=r.triplet_weight)

  # -- evaluation ----------------------------------------------------------------
  def _aux_fn(self, ctx: RunContext, keys: tuple[str, ...]):
    """Jitted ``(state, images) -> the aux entries named`` through
    ``ctx.forward``; XLA drops the outputs not asked for (the features)."""
    key = (id(ctx.forward), keys)
    if key not in self._fns:
      def fn(state, images):
        aux = ctx.forward(state, images)[1]
        out = {k: aux[k] for k in keys if k != "embedding_bn"}
        if "embedding_bn" in keys:
          out["embedding_bn"] = l2_normalize(aux["embedding_bn"])
        return out
      self._fns[key] = jax.jit(fn)
    return self._fns[key]

  def _run(self, ctx: RunContext, state, paths, keys) -> dict[str, np.ndarray]:
    """Aux entries for every path, in order (all processes get all rows)."""
    fn = self._aux_fn(ctx, keys)
    out = {}
    for batch in reid_data.eval_batches(
        paths, self.config.data, batch_size=ctx.local_eval_batch,
        process_index=jax.process_index(), process_count=jax.process_count()):
      got = jax.device_get(fn(state, ctx.to_global({"image": batch["image"]})["image"]))
      for k, v in got.items():
        out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v)[:len(paths)] for k, v in out.items()}

  def embeddings(self, ctx: RunContext, state, split: str):
    """L2-normalised post-BN embeddings ``(query (Q, D), gallery (G, D))``."""
    step = int(jax.device_get(state.step))
    cached = self._cache.get(split)
    if cached is None or cached[0] != step:
      query, gallery = self.data.evals[split]
      q, g = (self._run(ctx, state, s.paths, ("embedding_bn",))["embedding_bn"]
              for s in (query, gallery))
      self._cache[split] = cached = (step, q, g)
    return cached[1], cached[2]

  def evaluate(self, ctx: RunContext, state, split: str) -> dict[str, float]:
    if split not in self.data.evals:
      raise ValueError(f"Unknown re-id split {split!r}; valid: {self.eval_splits()}.")
    q, g = self.embeddings(ctx, state, split)
    query, gallery = self.data.evals[split]
    return retrieval_metrics(q, query.identities, query.cameras, g,
                             gallery.identities, gallery.cameras,
                             block_size=self.config.reid.eval_block_size)

  def visual(self, ctx: RunContext, state, count: int) -> Visual | None:
    """Ranked maps of ``count`` test queries beside their top retrievals."""
    if count <= 0:
      return None
    split = self.eval_splits()[-1]
    q, g = self.embeddings(ctx, state, split)
    query, gallery = self.data.evals[split]
    picks = np.linspace(0, len(query) - 1, min(count, len(query))).astype(int)
    n = self.config.reid.num_retrieved
    dist = np.asarray(squared_distances(q[picks], g))
    # Display the protocol's ranking: junk and same-camera matches left out.
    hidden = (((gallery.identities[None] == query.identities[picks, None])
               & (gallery.cameras[None] == query.cameras[picks, None]))
              | (gallery.identities[None] == reid_data.JUNK))
    top = np.argsort(np.where(hidden, np.inf, dist), axis=1, kind="stable")[:, :n]
    paths = [query.paths[i] for i in picks] + [gallery.paths[j] for j in top.ravel()]
    out = self._run(ctx, state, paths, ("maps", "norms"))
    images = denormalize(np.stack([reid_data.eval_image(p, self.config.data)
                                   for p in paths]))
    return Visual("retrieval", f"{split}_retrieval", {
        "images": images, "maps": out["maps"], "norms": out["norms"],
        "query_ids": query.identities[picks], "query_cams": query.cameras[picks],
        "gallery_ids": gallery.identities[top],
        "gallery_cams": gallery.cameras[top],
        "distances": np.sqrt(np.take_along_axis(dist, top, 1))})
