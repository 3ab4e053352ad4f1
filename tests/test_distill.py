"""Distillation: the loss against hand-computed values, teacher checks, the
auxiliary heads' gradients; early stopping (that run, with no learning, is the
tiny teacher). A student distilled through the trainer: the paper's configs
(tests/test_paper_configs.py) and the ViT (tests/test_train.py)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from brnpa_jax.models import AUX_HEAD_SLICES
from brnpa_jax.tasks.distill import DistillationTask, distillation_loss, load_teacher
from brnpa_jax.train.trainer import train_and_evaluate
from helpers import FAST_PRNG, tiny_config

S = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], np.float32)
T = np.array([[1.0, 1.5, 0.0], [-2.0, 0.5, 2.5]], np.float32)
Y = np.array([0, 2], np.int32)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_matches_hand_computation():
  temp, alpha = 4.0, 0.7
  lt, ls = _np_log_softmax(T / temp), _np_log_softmax(S / temp)
  kl = np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
  ce = -np.mean(_np_log_softmax(S)[np.arange(2), Y])
  want = alpha * temp**2 * kl + (1 - alpha) * ce
  loss, got_kl, got_ce = distillation_loss(S, T, Y, temperature=temp, alpha=alpha)
  np.testing.assert_allclose([loss, got_kl, got_ce], [want, kl, ce], rtol=1e-5)
  # The first example by hand, with numbers: T=4, alpha=0.7.
  p_t = np.exp(T[0] / 4) / np.exp(T[0] / 4).sum()
  p_s = np.exp(S[0] / 4) / np.exp(S[0] / 4).sum()
  kl0 = float(np.sum(p_t * np.log(p_t / p_s)))
  loss0, _, _ = distillation_loss(S[:1], T[:1], Y[:1], temperature=4.0, alpha=0.7)
  ce0 = -np.log(np.exp(S[0, 0]) / np.exp(S[0]).sum())
  np.testing.assert_allclose(loss0, 0.7 * 16 * kl0 + 0.3 * ce0, rtol=1e-5)


def test_alpha_zero_is_cross_entropy_and_alpha_one_equal_logits_is_zero():
  loss, _, ce = distillation_loss(S, T, Y, temperature=6.0, alpha=0.0)
  np.testing.assert_allclose(loss, ce, rtol=1e-6)
  np.testing.assert_allclose(ce, -np.mean(_np_log_softmax(S)[np.arange(2), Y]),
                             rtol=1e-5)
  loss, kl, _ = distillation_loss(S, S, Y, temperature=6.0, alpha=1.0)
  assert abs(float(loss)) < 1e-6 and abs(float(kl)) < 1e-7


def test_teacher_gradient_is_stopped():
  import jax
  g = jax.grad(lambda t: distillation_loss(S, t, Y, temperature=2.0, alpha=0.5)[0])(
      jnp.asarray(T))
  assert float(jnp.abs(g).max()) == 0.0


def test_missing_teacher_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="teacher_workdir is empty"):
    load_teacher("", 10, "float32")
  with pytest.raises(FileNotFoundError, match="No teacher config"):
    load_teacher(str(tmp_path / "nowhere"), 10, "float32")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="No best checkpoint"):
    load_teacher(str(tmp_path), 10, "float32")




@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tfds_dir):
  """A low-resolution run that cannot change (lr 0, BatchNorm frozen), so
  every epoch's validation ties with the first; patience 1 stops it after 2
  of its 4 epochs. Its best checkpoint is the teacher below."""
  data_dir = tfds_dir
  workdir = tmp_path_factory.mktemp("teacher")
  cfg = tiny_config(data_dir, "runlocal,res=low,epochs=4", num_overlays=0,
                    early_stopping_patience=1,
                    **{"optim.lr": 0.0, "model.freeze_bn": True})
  summary = train_and_evaluate(cfg, str(workdir))
  return data_dir, workdir, summary


@pytest.mark.slow
def test_teacher_is_checked_against_the_student(teacher_run):
  """The teacher's saved config is what it was trained with; a checkpoint
  that does not fit (another class count) is an error. (A student distilled
  through the trainer: tests/test_paper_configs.py, and the ViT in
  tests/test_train.py.)"""
  _, teacher_dir, _ = teacher_run
  saved = json.load(open(teacher_dir / "config.json"))
  assert saved["model"]["res"] == "low"
  _, variables, config = load_teacher(str(teacher_dir), 10, "float32")
  assert config.model.res == "low" and "params" in variables
  with pytest.raises(ValueError, match="do not fit"):
    load_teacher(str(teacher_dir), 7, "float32")


@pytest.mark.slow
def test_early_stopping_after_patience_epochs(teacher_run):
  """Every epoch ties (a tie is no improvement), so the first stays best and
  patience 1 stops the run after epoch 2, before epochs 3 and 4."""
  _, workdir, summary = teacher_run
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  val = [r for r in rows if "val_accuracy" in r]
  assert [r["step"] for r in val] == [8, 16]  # 256 examples / batch 32
  assert {k: v for k, v in val[0].items() if k != "step"} == {
      k: v for k, v in val[1].items() if k != "step"}  # a tie, exactly
  assert max(r.get("step", 0) for r in rows) == 16  # epochs 3 and 4: not run
  assert summary["best_step"] == 8


@pytest.mark.slow
def test_aux_heads_train_under_distillation(teacher_run):
  """As in the authors' release, the auxiliary heads' cross-entropies join
  the distillation loss: every aux head gets a gradient."""
  data_dir, teacher_dir, _ = teacher_run
  cfg = tiny_config(data_dir, "runlocal,res=high,aux_heads", num_overlays=0,
                    task="distill")
  cfg.unlock()
  cfg.distill = ml_collections.ConfigDict(dict(
      teacher_workdir=str(teacher_dir), temperature=6.0, alpha=0.5))
  cfg.lock()
  task = DistillationTask(cfg)
  model = task.build_model(task.num_classes())
  images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  batch = {"image": images, "label": jnp.array([0, 1, 2, 3])}
  variables = jax.jit(model.init)(jax.random.key(0, impl=FAST_PRNG), images)
  context = task.train_context()

  def loss(params, context):
    (logits, aux), _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, images,
        train=True, mutable=["batch_stats"])
    total, metrics = task.loss_and_metrics(logits, aux, batch, context)
    return total, metrics

  # Jitted: op by op, the backward pass alone takes minutes.
  grads, metrics = jax.jit(jax.grad(loss, has_aux=True))(variables["params"],
                                                         context)
  for name in AUX_HEAD_SLICES:
    assert float(jnp.abs(grads[f"aux_{name}"]["kernel"]).sum()) > 0, name
    assert f"aux_{name}_loss" in metrics
  assert float(metrics["loss"]) > float(
      sum(metrics[f"aux_{n}_loss"] for n in AUX_HEAD_SLICES))
