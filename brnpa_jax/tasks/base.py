"""The task interface: what a problem adds to the shared trainer.

The trainer (loop, jitted sharded steps, checkpoints, best-model selection,
early stopping, resume) is the same for every task; a ``Task`` supplies the
data, the model, the loss (pure, traced into the train step) and the
evaluation (host side). ``config.task`` names one in ``brnpa_jax.tasks.TASKS``.

Tasks never see the trainer: evaluation receives a ``RunContext`` (the
run's jitted inference functions, batch placement and workdir), and what a
task wants drawn at the end of a run it returns as a ``Visual`` for
``brnpa_jax.explain.figures`` to draw.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from brnpa_jax.models import build_model

if TYPE_CHECKING:  # only named in annotations: the losses of the tasks stay
  # importable where ml_collections is not installed (the GPU benchmarks).
  from brnpa_jax.runs import Workdir


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What a task may use of the run it serves.

  Attributes:
    forward: jitted ``(state, images) -> (logits, aux)`` in inference mode;
      images are global arrays (see ``to_global``).
    predict: jitted ``(state, images) -> {'probs', 'maps', 'norms'}``.
    eval_step: jitted ``(state, batch) -> sums`` of the task's
      ``eval_metrics`` (None when the task defines none).
    to_global: this process's numpy batch (a dict) -> global sharded arrays.
    local_eval_batch: this process's evaluation batch size.
    workdir: the run's workdir.
  """
  forward: Callable
  predict: Callable
  eval_step: Callable | None
  to_global: Callable
  local_eval_batch: int
  workdir: Workdir


@dataclasses.dataclass
class Visual:
  """A picture a task asks for at the end of a run.

  Attributes:
    kind: ``ranked_maps`` (per image: the image, the ranks overlaid, each
      rank alone) or ``retrieval`` (per query: its maps, then those of its
      top retrievals).
    name: file stem under the workdir's ``overlays/``.
    data: what the drawing reads: ``images`` uint8 (N, H, W, 3), ``maps``
      (N, K, h, w), ``norms`` (N, h, w), ``titles`` and, for retrieval, the
      identities, cameras and distances of ``explain.figures``.
  """
  kind: str
  name: str
  data: dict[str, Any]


def _pipeline():
  # Imported on use: TensorFlow is a dependency of the data path only, so the
  # pure parts (losses, steps, benchmarks) import without it.
  from brnpa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline


class Task(abc.ABC):
  """Base task: reads ``config.data`` through ``input_pipeline``.

  Subclasses define the loss and the evaluation, and override what else
  differs. Attributes:
    selection_metric: the key of ``evaluate``'s result that selects the best
      model on the validation split (higher is better).
  """

  selection_metric = "accuracy"

  def __init__(self, config):
    self.config = config

  # -- data (host side) ------------------------------------------------------
  def prepare_data(self) -> None:
    """Makes the data ready (a generated dataset builds itself). Multi-process
    runs call it on process 0 first, then on the others."""
    _pipeline().get_builder(self.config.data)

  def num_classes(self) -> int:
    return _pipeline().num_classes(self.config.data)

  def class_names(self) -> list[str] | None:
    """Class names in label order, for predictions and figures (None: the
    task's outputs are not classes of a dataset)."""
    return _pipeline().class_names(self.config.data)

  def num_train_examples(self) -> int:
    data = self.config.data
    return _pipeline().num_examples(data, data.train_split)

  def train_dataset(self, *, batch_size: int, seed: int, epoch: int,
                    process_index: int, process_count: int):
    """One epoch of this process's batches, deterministic from (seed, epoch)."""
    return _pipeline().make_train_dataset(
        self.config.data, batch_size=batch_size, seed=seed, epoch=epoch,
        process_index=process_index, process_count=process_count)

  def eval_dataset(self, split: str, *, batch_size: int, process_index: int,
                   process_count: int):
    """The split in order, last batch padded, with a ``mask`` of real examples."""
    return _pipeline().make_eval_dataset(
        self.config.data, split, batch_size=batch_size,
        process_index=process_index, process_count=process_count)

  def eval_splits(self) -> list[str]:
    """First: validation (model selection); all: evaluated on the best state."""
    return list(self.config.data.eval_splits)

  # -- model -------------------------------------------------------------------
  def build_model(self, num_classes: int):
    return build_model(self.config.model, num_classes, self.config.dtype)

  def initial_state(self, state):
    """The state a fresh run starts from (not called when resuming): e.g.
    episodic fine-tuning starts from a pretraining run's weights."""
    return state

  # -- inside the jitted train step (pure) -------------------------------------
  def train_context(self) -> Any:
    """Extra arrays the train step receives (replicated), e.g. a teacher."""
    return None

  @abc.abstractmethod
  def loss_and_metrics(self, logits, aux, batch, context):
    """``(loss, metrics)``; metrics are scalars and include ``loss``."""

  # -- evaluation (host side) --------------------------------------------------
  @abc.abstractmethod
  def evaluate(self, ctx: RunContext, state, split: str) -> dict[str, float]:
    """The split's metrics for ``state``, ``selection_metric`` among them."""

  def visual(self, ctx: RunContext, state, count: int) -> Visual | None:
    """What to draw of the best state's maps on ``count`` examples."""
    del ctx, state, count
    return None
