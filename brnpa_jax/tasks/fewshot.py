"""Few-shot classification: pretraining, episodic fine-tuning, episode evaluation.

Two training phases (``config.fewshot.phase``):

- ``pretrain``: cross-entropy on the base classes (the classifier layer has
  one output per base class).
- ``episodic``: prototypical loss (Snell et al. 2017). A training batch holds
  whole N-way K-shot episodes (``data.fewshot.episode_layout`` rows each);
  each query's logits are the negative squared Euclidean distances (or
  scaled cosine similarities) of its embedding to the class prototypes, the
  means of the support embeddings. The state starts from the best checkpoint
  of a pretraining workdir (``config.fewshot.pretrain_workdir``).

The embedding is the head's pooled vector before dropout and the final
layer (``aux['embedding']``; for BR-NPA the K ranked vectors concatenated,
K*C). Evaluation embeds a split once, then scores N-way K-shot episodes drawn
from ``config.fewshot.eval_seed``, batched with ``jax.vmap``, with the
prototype classifier (Euclidean) and the cosine classifier; it reports the
mean accuracy and its 95% confidence interval (1.96 std / sqrt(episodes)).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax.choices import FEWSHOT_PHASES as PHASES
from brnpa_jax.data import fewshot as data_lib
from brnpa_jax.data.generators import as_tf_dataset
from brnpa_jax.data.normalization import denormalize
from brnpa_jax.models.weights import check_same_tree
from brnpa_jax.runs import Workdir, restore_variables
from brnpa_jax.tasks import classification, distill
from brnpa_jax.tasks.base import RunContext, Task, Visual

from brnpa_jax.tasks.prototypes import (  # noqa: F401  (the task's API)
    METRICS, episode_accuracies, prototype_logits, prototypical_loss)


def mean_ci95(values) -> tuple[float, float]:
  """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)``."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(1.96 * values.std() / math.sqrt(len(values)))


def evaluate_episodes(embeddings_NxD, sampler: data_lib.EpisodeSampler,
                      num_episodes: int, batch: int) -> dict[str, float]:
  """Scores ``num_episodes`` episodes, ``batch`` at a time (one compile).

  Returns:
    ``{'prototype': mean, 'prototype_ci95': ..., 'cosine': ..., 'cosine_ci95':
    ...}`` over the episodes.
  """
  emb = jnp.asarray(embeddings_NxD, jnp.float32)
  batch = min(batch, num_episodes)
  proto, cos = [], []
  for start in range(0, num_episodes, batch):
    count = min(batch, num_episodes - start)
    eps = sampler.episodes(start, count)
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], batch - count, 0)])
    p, c = episode_accuracies(emb, pad(eps.support), pad(eps.query))
    proto.append(np.asarray(p)[:count])
    cos.append(np.asarray(c)[:count])
  out = {}
  for name, accs in (("prototype", proto), ("cosine", cos)):
    out[name], out[f"{name}_ci95"] = mean_ci95(np.concatenate(accs))
  return out


def split_embeddings(ctx: RunContext, state, images_uint8, size: int) -> np.ndarray:
  """Embeds every image of a split once (centre crop), in padded batches.

  Each process feeds its contiguous share of the split; ``ctx.forward``
  returns the global batch (every process's rows), which is put back in
  split order.

  Returns:
    float32 (n, D) numpy embeddings.
  """
  n, procs, me = len(images_uint8), jax.process_count(), jax.process_index()
  local = ctx.local_eval_batch
  per_process = math.ceil(n / procs)
  mine = np.arange(me * per_process, min((me + 1) * per_process, n))
  chunks = []
  for start in range(0, max(per_process, 1), local):
    index = mine[start:start + local]
    images = np.zeros((local, size, size, 3), np.float32)
    images[:len(index)] = data_lib.center(images_uint8[index], size)
    _, aux = ctx.forward(state, ctx.to_global({"image": images})["image"])
    emb = np.asarray(jax.device_get(aux["embedding"]), np.float32)
    chunks.append(emb.reshape(procs, local, -1))
  rows = np.concatenate(chunks, axis=1)[:, :per_process]
  return rows.reshape(procs * per_process, -1)[:n]


# -- initialisation from a pretraining run --------------------------------------


def load_pretrained(workdir: str):
  """``(params, batch_stats, step)`` of the best checkpoint in ``workdir``.

  Raises:
    FileNotFoundError: no ``best`` checkpoint there (with the command to make
      one).
  """
  wd = Workdir(workdir)
  best_dir = wd.best_dir
  hint = ("Run the pretrain phase first (phase=pretrain, with this workdir) "
          "or set config.fewshot.pretrain_workdir to a finished pretraining "
          "workdir.")
  if not os.path.isdir(best_dir):
    raise FileNotFoundError(f"No pretraining checkpoint: {best_dir} does not "
                            f"exist. {hint}")
  try:
    variables, step, _ = restore_variables(wd.path, "best")
  except FileNotFoundError:
    raise FileNotFoundError(f"{best_dir} holds no checkpoint. {hint}") from None
  return variables["params"], variables.get("batch_stats", {}), step


# -- the task -------------------------------------------------------------------


class FewShotTask(Task):
  """Few-shot classification on the trainer; see the module docstring.

  Reads ``config.fewshot`` (phase, episodes, metric, evaluation protocol)
  and ``config.data`` (dataset, image size, augmentation); see
  ``configs/fewshot_cub.py``.
  """

  def __init__(self, config):
    self.config = config
    fs = config.fewshot
    if fs.phase not in PHASES:
      raise ValueError(f"fewshot.phase={fs.phase!r}; valid: {PHASES}.")
    if fs.metric not in METRICS:
      raise ValueError(f"fewshot.metric={fs.metric!r}; valid: {METRICS}.")
    if self._distill() is not None and fs.phase != "pretrain":
      raise ValueError("Distillation (distill.teacher_workdir) applies to the "
                       "pretraining phase; clear it for phase=episodic.")
    if fs.phase == "episodic":
      if not fs.pretrain_workdir:
        raise ValueError("phase=episodic starts from a pretrained model: set "
                         "config.fewshot.pretrain_workdir to the workdir of a "
                         "phase=pretrain run.")
      if config.get("grad_accum_steps", 1) > 1:
        raise ValueError("Gradient accumulation cuts batches across episodes; "
                         "set grad_accum_steps=1 for phase=episodic.")
      self.episode_rows = fs.train_ways * (fs.train_shots + fs.train_queries)
      if config.batch_size % self.episode_rows:
        raise ValueError(
            f"batch_size={config.batch_size} must be whole training episodes of "
            f"{fs.train_ways} x ({fs.train_shots} + {fs.train_queries}) = "
            f"{self.episode_rows} rows.")
    self.select_shots = fs.select_shots
    if self.select_shots not in tuple(fs.eval_shots):
      raise ValueError(f"fewshot.select_shots={self.select_shots} must be one "
                       f"of eval_shots {tuple(fs.eval_shots)}.")
    self.selection_metric = self._key(fs.eval_ways, self.select_shots)
    self._sets: dict[str, data_lib.ImageSet] = {}

  @staticmethod
  def _key(ways: int, shots: int) -> str:
    return f"{ways}way_{shots}shot_accuracy"

  # -- data ---------------------------------------------------------------------
  def image_set(self, split: str) -> data_lib.ImageSet:
    """A class split in memory (read once per task)."""
    if split not in self._sets:
      self._sets[split] = data_lib.load_split(self.config.data, split)
    return self._sets[split]

  def prepare_data(self) -> None:
    """Prepares the tfds dataset (downloads Omniglot); checks a folder."""
    data_lib.prepare(self.config.data)

  def num_classes(self) -> int:
    return self.image_set("base").num_classes

  def class_names(self) -> list[str] | None:
    if self.config.fewshot.phase != "pretrain":
      return None  # episodes, not classes
    base = self.image_set("base")
    return [str(c) for c in base.class_ids]

  def eval_sampler(self, split: str, shots: int) -> data_lib.EpisodeSampler:
    """The evaluation episodes of ``split`` (the same for every model)."""
    fs = self.config.fewshot
    try:
      return data_lib.EpisodeSampler(self.image_set(split).labels, fs.eval_ways,
                                     shots, fs.eval_queries, fs.eval_seed)
    except ValueError as e:
      raise ValueError(f"Evaluation episodes of the {split!r} classes: {e} "
                       "(config.fewshot.eval_ways / eval_shots / "
                       "eval_queries).") from e

  def num_train_examples(self) -> int:
    # The trainer asks this first: check the evaluation episodes now rather
    # than after the first epoch.
    for split in self.eval_splits():
      for shots in self.config.fewshot.eval_shots:
        self.eval_sampler(split, shots)
    if self.config.fewshot.phase == "pretrain":
      return len(self.image_set("base"))
    return self.config.fewshot.episodes_per_epoch * self.episode_rows

  def train_sampler(self, seed: int) -> data_lib.EpisodeSampler:
    fs = self.config.fewshot
    # Its own stream: training episodes never coincide with evaluation ones.
    stream = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    return data_lib.EpisodeSampler(self.image_set("base").labels, fs.train_ways,
                                   fs.train_shots, fs.train_queries, stream)

  def train_dataset(self, *, batch_size, seed, epoch, process_index,
                    process_count):
    cfg, fs = self.config, self.config.fewshot
    data, size = self.image_set("base"), cfg.data.image_size
    image = ((batch_size, size, size, 3), np.float32)
    label = ((batch_size,), np.int32)
    if fs.phase == "pretrain":
      make = lambda: data_lib.classification_batches(
          data, batch_size=batch_size, seed=seed, epoch=epoch, size=size,
          flip=cfg.data.flip, process_index=process_index,
          process_count=process_count)
      return as_tf_dataset(make, {"image": image, "label": label})
    if batch_size % self.episode_rows:
      raise ValueError(f"The per-process batch {batch_size} is not whole "
                       f"episodes of {self.episode_rows} rows; use a batch_size "
                       f"that is a multiple of {self.episode_rows} x processes.")
    per_batch = batch_size // self.episode_rows
    steps = self.num_train_examples() // (batch_size * process_count)
    sampler = self.train_sampler(seed)
    make = lambda: data_lib.episode_batches(
        data, sampler, episodes_per_batch=per_batch, num_batches=steps,
        first_episode=epoch * steps * per_batch * process_count, seed=seed,
        size=size, flip=cfg.data.flip, process_index=process_index,
        process_count=process_count)
    return as_tf_dataset(make, {"image": image, "label": label,
                                "episode_class": label})

  # -- loss ---------------------------------------------------------------------
  def _distill(self):
    """The ``distill`` section when a teacher is set (pretraining only)."""
    d = self.config.get("distill")
    return d if d is not None and d.get("teacher_workdir") else None

  def train_context(self):
    """The frozen teacher's variables (replicated by the trainer), or None.

    Also sets ``self.teacher``, the model ``loss_and_metrics`` applies them to
    (the trainer calls this before it traces the step).
    """
    if self._distill() is None:
      return None
    self.teacher, variables, _ = distill.load_teacher(
        self.config.distill.teacher_workdir, self.num_classes(),
        self.config.dtype)
    return variables

  def loss_and_metrics(self, logits, aux, batch, context):
    fs = self.config.fewshot
    if fs.phase == "pretrain" and self._distill() is not None:
      d = self.config.distill
      loss, metrics, _ = distill.teacher_loss_and_metrics(
          self.teacher, context, logits, batch, temperature=d.temperature,
          alpha=d.alpha)
      return loss, metrics
    if fs.phase == "pretrain":
      return classification.loss_and_metrics(
          logits, aux, batch,
          label_smoothing=self.config.get("label_smoothing", 0.0))
    loss, accuracy = prototypical_loss(
        aux["embedding"], batch["label"], ways=fs.train_ways, shots=fs.train_shots,
        queries=fs.train_queries, metric=fs.metric,
        scale=fs.cosine_scale if fs.metric == "cosine" else 1.0)
    return loss, {"loss": loss, "accuracy": accuracy}

  def initial_state(self, state):
    """A fresh state's parameters replaced by the pretraining run's best
    (episodic phase; the optimiser state stays fresh, step 0)."""
    if self.config.fewshot.phase != "episodic":
      return state
    params, batch_stats, _ = load_pretrained(self.config.fewshot.pretrain_workdir)
    check_same_tree(
        {"params": params, "batch_stats": batch_stats},
        {"params": state.params, "batch_stats": state.batch_stats},
        what=f"the pretraining run {self.config.fewshot.pretrain_workdir}",
        hint="Same backbone, head, width and base classes needed.")
    put = lambda new, old: jax.tree.map(
        lambda n, o: jax.device_put(jnp.asarray(n, o.dtype), o.sharding), new, old)
    return state.replace(params=put(params, state.params),
                         batch_stats=put(batch_stats, state.batch_stats))

  # -- evaluation -----------------------------------------------------------------
  def evaluate(self, ctx: RunContext, state, split: str) -> dict[str, float]:
    """Episode accuracies (prototype and cosine) with 95% intervals.

    Keys ``{N}way_{K}shot_accuracy`` (prototype classifier, the selection
    metric for ``select_shots``), ``..._ci95``, ``{N}way_{K}shot_cosine`` and
    ``..._cosine_ci95`` for each K in ``eval_shots``.
    """
    fs = self.config.fewshot
    data = self.image_set(split)
    emb = split_embeddings(ctx, state, data.images, self.config.data.image_size)
    out = {}
    for shots in fs.eval_shots:
      r = evaluate_episodes(emb, self.eval_sampler(split, shots),
                            fs.eval_episodes, fs.eval_episode_batch)
      key = self._key(fs.eval_ways, shots)
      out.update({key: r["prototype"], f"{key}_ci95": r["prototype_ci95"],
                  key.replace("accuracy", "cosine"): r["cosine"],
                  key.replace("accuracy", "cosine_ci95"): r["cosine_ci95"]})
    return out

  def visual(self, ctx: RunContext, state, count: int) -> Visual | None:
    """Ranked maps of the best state on one image of each of the first
    ``count`` classes of the last evaluation split (novel)."""
    if count <= 0:
      return None
    split, size = self.eval_splits()[-1], self.config.data.image_size
    data = self.image_set(split)
    index = np.unique(data.labels, return_index=True)[1][
        :min(count, ctx.local_eval_batch)]
    images = np.zeros((ctx.local_eval_batch, size, size, 3), np.float32)
    images[:len(index)] = data_lib.center(data.images[index], size)
    out = jax.device_get(ctx.predict(
        state, ctx.to_global({"image": images})["image"]))
    n = len(index)
    return Visual("ranked_maps", f"{split}_ranked_maps", {
        "images": denormalize(images[:n]), "maps": out["maps"][:n],
        "norms": out["norms"][:n],
        "titles": [f"{split} class {data.class_ids[data.labels[i]]}"
                   for i in index]})
