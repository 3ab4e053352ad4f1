"""What the few-shot configs share: switches, the ``fewshot`` section, recipes.

``configs/fewshot_cub.py``, ``fewshot_omniglot.py`` and ``fewshot_folder.py``
call ``fewshot_config`` with their dataset's defaults.
"""

from __future__ import annotations

import ml_collections

from brnpa_jax.config_args import Switches, parse_arg
from brnpa_jax.models import BACKBONES, HEADS, STRIDES

SWITCHES = {
    "backbone": "resnet12", "head": "brnpa", "res": "high", "k": 3, "width": 64,
    "phase": "pretrain", "pretrain_workdir": "", "ways": 5, "shots": 5,
    "queries": 15, "metric": "euclidean", "teacher": "", "size": 0, "epochs": 0,
    "dtype": "float32", "runlocal": False,
}
CHOICES = {"backbone": tuple(BACKBONES), "head": tuple(HEADS),
           "res": ("low", "high"), "phase": ("pretrain", "episodic"),
           "metric": ("euclidean", "cosine"), "dtype": ("float32", "bfloat16")}


def fewshot_config(arg: str | None, *, name: str, image_size: int,
                   resize_ratio: float, flip: bool, pretrain_epochs: int,
                   episodic_epochs: int, pretrain_batch: int,
                   extra_switches: dict | None = None
                   ) -> tuple[ml_collections.ConfigDict, Switches]:
  """A few-shot config for dataset ``name``, adjusted by the ``arg`` switches.

  Returns:
    ``(config, switches)``, the config unlocked so the caller can add its
    dataset's fields, then lock it.
  """
  a = parse_arg(arg, {**SWITCHES, **(extra_switches or {})}, CHOICES)
  episodic = a["phase"] == "episodic"
  c = ml_collections.ConfigDict()
  c.task = "fewshot"
  c.seed = 0
  c.dtype = a["dtype"]
  c.mesh = ml_collections.ConfigDict(dict(num_devices=0, fsdp=1))

  # Class splits: training on base, selection on val, final numbers on novel
  # (brnpa_jax/data/fewshot.py defines them per dataset).
  c.data = ml_collections.ConfigDict(dict(
      name=name, data_dir="~/tensorflow_datasets",
      image_size=a["size"] or image_size, resize_ratio=resize_ratio, flip=flip,
      eval_splits=("val", "novel"),
      folder=ml_collections.ConfigDict(dict(root="",
                                            splits=("train", "val", "test")))))

  c.model = ml_collections.ConfigDict(dict(
      backbone=a["backbone"], width=a["width"], res=a["res"], head=a["head"],
      num_maps=a["k"], refine=True, init="norm", aux_heads=False, dropout=0.0,
      use_bias=True, zero_init_residual=False, freeze_bn=False))

  c.fewshot = ml_collections.ConfigDict(dict(
      phase=a["phase"],
      # Episodic fine-tuning starts from this pretraining workdir's best state.
      pretrain_workdir=a["pretrain_workdir"],
      train_ways=a["ways"], train_shots=a["shots"], train_queries=a["queries"],
      episodes_per_epoch=500, metric=a["metric"], cosine_scale=10.0,
      # Evaluation protocol: the same episodes for every model (eval_seed).
      eval_ways=5, eval_shots=(1, 5), eval_queries=15, eval_episodes=600,
      eval_seed=0, eval_episode_batch=100, select_shots=1))

  # Pretraining distilled from a low-resolution model (docs/method.md#few-shot-classification): the
  # teacher is the best state of a finished pretraining workdir (its model as
  # its config.json describes it, e.g. res=low).
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir=a["teacher"], temperature=16.0, alpha=0.4))

  if episodic:  # small steps from the pretrained state
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd", lr=1e-3, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
        weight_decay=5e-4, schedule="cosine", warmup_epochs=0.0,
        step_every_epochs=2, step_gamma=0.9, grad_clip_norm=0.0))
  else:
    c.optim = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.05, momentum=0.9, nesterov=True, b1=0.9, b2=0.999,
        weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
        step_every_epochs=2, step_gamma=0.9, grad_clip_norm=0.0))
  c.label_smoothing = 0.0

  episode_rows = a["ways"] * (a["shots"] + a["queries"])
  c.batch_size = episode_rows if episodic else pretrain_batch  # global
  c.grad_accum_steps = 1
  c.eval_batch_size = 200
  c.num_epochs = a["epochs"] or (episodic_epochs if episodic else pretrain_epochs)
  # Steps with a non-finite loss, gradient or update are skipped; more stop
  # the run.
  c.max_nonfinite_steps = 10
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.max_to_keep = 2
  c.num_overlays = 8  # ranked maps of one image per novel class, at the end

  if a["runlocal"]:  # a smoke test; switches given explicitly stay
    if "width" not in a.given:
      c.model.width = 8
    c.data.image_size = a["size"] or 32
    c.fewshot.episodes_per_epoch = 4
    c.fewshot.eval_episodes, c.fewshot.eval_episode_batch = 20, 10
    c.batch_size = episode_rows if episodic else 32
    c.eval_batch_size, c.num_epochs = 32, a["epochs"] or 1
    c.log_every_steps, c.checkpoint_every_steps, c.num_overlays = 2, 4, 4
  return c, a
