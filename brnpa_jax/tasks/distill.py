"""Low-to-high resolution distillation (docs/method.md#distillation).

The student (the configured model, typically ``res=high``) learns from the
frozen teacher's logits (a finished run, typically ``res=low``) and from the
labels:

  loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

with the KL summed over classes and averaged over the batch. The teacher is
restored from ``config.distill.teacher_workdir`` (its ``config.json`` and best
checkpoint) and runs in inference mode inside the jitted train step; its
variables are an argument of the step, not constants baked into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brnpa_jax.runs import Workdir, load_run
from brnpa_jax.tasks import classification


def distillation_loss(student_logits_BxN, teacher_logits_BxN, labels_B, *,
                      temperature: float, alpha: float):
  """Knowledge-distillation loss on logits; returns ``(loss, kl, ce)``.

  Args:
    student_logits_BxN: the student's logits.
    teacher_logits_BxN: the teacher's logits (gradients are stopped).
    labels_B: integer labels.
    temperature: T > 0, softens both distributions.
    alpha: weight of the KL term in [0, 1]; 0 is plain cross-entropy.

  Returns:
    The loss and its two parts, batch means: ``kl`` (of the softened
    distributions, before the ``alpha * T^2`` factor) and ``ce``.
  """
  s = student_logits_BxN.astype(jnp.float32) / temperature
  t = jax.lax.stop_gradient(teacher_logits_BxN.astype(jnp.float32)) / temperature
  log_p_t, log_p_s = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
  kl = jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))
  ce = jnp.mean(classification.cross_entropy(student_logits_BxN, labels_B))
  loss = alpha * temperature ** 2 * kl + (1.0 - alpha) * ce
  return loss, kl, ce


def load_teacher(teacher_workdir: str, num_classes: int, dtype: str):
  """``(model, variables, config)`` of a finished run's best checkpoint.

  Raises:
    FileNotFoundError: the workdir, its config or its best checkpoint is missing.
    ValueError: the checkpoint does not fit the model its config describes.
  """
  if not teacher_workdir:
    raise ValueError("config.distill.teacher_workdir is empty: set it to the "
                     "workdir of the finished low-resolution run.")
  wd = Workdir(teacher_workdir)
  if not wd.has_config():
    raise FileNotFoundError(
        f"No teacher config at {wd.config_file}: config.distill.teacher_workdir "
        "must be the workdir of a finished train.py run (train the "
        "low-resolution model first).")
  try:
    run = load_run(wd.path, checkpoint="best", num_classes=num_classes,
                   dtype=dtype)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"No best checkpoint in {wd.best_dir}: the teacher run has not finished "
        "an epoch. Train it (or let it resume) before distilling.") from None
  return run.model, run.variables, run.config


def teacher_loss_and_metrics(teacher, teacher_variables, logits_BxN, batch, *,
                             temperature: float, alpha: float):
  """The distillation loss of a student's logits against a frozen teacher
  applied to the same batch.

  Returns:
    ``(loss, metrics, teacher_logits)``; metrics: ``loss``, ``kl``, ``ce`` and
    the student's ``accuracy`` (batch means).
  """
  teacher_logits, _ = teacher.apply(teacher_variables, batch["image"], train=False)
  loss, kl, ce = distillation_loss(logits_BxN, teacher_logits, batch["label"],
                                   temperature=temperature, alpha=alpha)
  correct = jnp.argmax(logits_BxN, -1) == batch["label"]
  return loss, {"loss": loss, "kl": kl, "ce": ce,
                "accuracy": jnp.mean(correct.astype(jnp.float32))}, teacher_logits


class DistillationTask(classification.ClassificationTask):
  """Classification whose loss distils a frozen teacher's logits.

  Reads ``config.distill.teacher_workdir``, ``temperature`` and ``alpha``.
  With ``model.aux_heads`` the auxiliary heads' cross-entropies are added to
  the distillation loss, as in the authors' release. Evaluation and model
  selection are the student's plain accuracy.

  Args:
    config: the student's config.
    teacher: ``(model, variables, config)`` of the teacher; None restores
      it from ``teacher_workdir``. Compiling ahead of time passes the
      variables' ShapeDtypeStructs (``brnpa_jax.train.aot``).
  """

  def __init__(self, config, teacher=None):
    super().__init__(config)
    d = config.get("distill")
    if d is None:
      raise ValueError("task='distill' needs a config.distill section with "
                       "teacher_workdir, temperature and alpha.")
    if not d.temperature > 0 or not 0.0 <= d.alpha <= 1.0:
      raise ValueError(f"distill.temperature must be > 0 and alpha in [0, 1]; "
                       f"got T={d.temperature}, alpha={d.alpha}.")
    self.temperature, self.alpha = float(d.temperature), float(d.alpha)
    if teacher is None:
      teacher = load_teacher(d.teacher_workdir, self.num_classes(), config.dtype)
    self.teacher, self.teacher_variables, self.teacher_config = teacher

  def train_context(self):
    return self.teacher_variables

  def loss_and_metrics(self, logits, aux, batch, context):
    loss, metrics, teacher_logits = teacher_loss_and_metrics(
        self.teacher, context, logits, batch, temperature=self.temperature,
        alpha=self.alpha)
    aux_loss, aux_metrics = classification.aux_heads_loss(aux, batch["label"])
    agree = jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
    metrics.update(aux_metrics, loss=loss + aux_loss,
                   teacher_agreement=jnp.mean(agree.astype(jnp.float32)))
    return loss + aux_loss, metrics
