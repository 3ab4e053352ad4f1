"""Sharded steps on 8 fake CPU devices: data parallel, FSDP, accumulation, bf16."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from brnpa_jax.models import build_model
from brnpa_jax.tasks import classification
from brnpa_jax.train import sharding as shd
from brnpa_jax.train import steps as steps_lib
from brnpa_jax.train.steps import jit_steps

pytestmark = pytest.mark.slow  # trains or compiles end to end

BATCH, SIZE = 16, 32
CLASSIFY = dict(loss_fn=classification.loss_and_metrics,
                metrics_fn=classification.eval_metrics)


def _model(dtype="float32", freeze_bn=False, head="gap", backbone="resnet_tiny"):
  cfg = ml_collections.ConfigDict(dict(
      backbone=backbone, width=8, res="high", head=head, num_maps=3, refine=True,
      init="norm", aux_heads=False, dropout=0.0, use_bias=True, freeze_bn=freeze_bn))
  return build_model(cfg, num_classes=5, dtype=dtype)


def _batch(seed=0, n=BATCH):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32),
          "label": rng.integers(0, 5, n).astype(np.int32)}


def _train(mesh, model, num_steps=3, grad_accum_steps=1, tx=None):
  tx = tx or optax.sgd(0.05, momentum=0.9)
  chex.clear_trace_counter()  # counts are per code location, not per instance
  make = steps_lib.make_train_step
  with pytest.MonkeyPatch.context() as mp:  # the step may trace only once
    mp.setattr(steps_lib, "make_train_step",
               lambda *a, **kw: chex.assert_max_traces(make(*a, **kw), n=1))
    steps = jit_steps(model, tx, mesh, (1, SIZE, SIZE, 3),
                      grad_accum_steps=grad_accum_steps, **CLASSIFY)
  state = steps.init(jax.random.key(0))
  train = steps.train
  losses = []
  for i in range(num_steps):
    batch = shd.to_global(_batch(i), steps.data_sharding)
    state, metrics = train(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return state, losses, steps


def _assert_same_params(a, b, rtol=2e-4, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
  for x, y in zip(jax.tree.leaves(a.batch_stats), jax.tree.leaves(b.batch_stats)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# Multi-step comparisons use the gap head: BR-NPA's argmax selection is
# discontinuous, so float-rounding differences between reduction orders can
# flip a near-tie and the runs then diverge legitimately. One BR-NPA step is
# compared on its own below.


@pytest.fixture(scope="module")
def single_device_run():
  assert jax.device_count() == 8, "conftest.py sets 8 fake CPU devices"
  return _train(shd.make_mesh(1), _model())


# fsdp=2 is compared with one device in the ViT + BR-NPA test below.
@pytest.mark.parametrize("fsdp", [1, 4])
def test_sharded_step_equals_single_device(single_device_run, fsdp):
  """Data parallel (fsdp=1) and data+fsdp give the single-device parameters;
  under fsdp the state is split across the devices, optimizer state too."""
  reference, ref_losses, _ = single_device_run
  state, losses, steps = _train(shd.make_mesh(8, fsdp=fsdp), _model())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_same_params(state, reference)
  specs = {s.spec for s in jax.tree.leaves(steps.state_sharding.params)}
  if fsdp > 1:
    assert any(shd.FSDP_AXIS in spec for spec in specs)
    kernel = state.params["classifier"]["kernel"]  # (64, 5): 64 splits by 4
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (16, 5)
    momentum = state.opt_state[0].trace["classifier"]["kernel"]
    assert momentum.sharding.spec == kernel.sharding.spec  # optimizer state follows
  else:
    assert specs == {jax.sharding.PartitionSpec()}


def test_sharded_vit_brnpa_step_equals_single_device():
  """The ViT with the BR-NPA head under fsdp=2: its attention and MLP
  matrices are split in two, and a step gives the single-device parameters
  (one step: see above)."""
  model = lambda: _model(head="brnpa", backbone="vit_test")
  single, losses1, _ = _train(shd.make_mesh(1), model(), num_steps=1)
  sharded, losses8, steps = _train(shd.make_mesh(8, fsdp=2), model(),
                                   num_steps=1)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  _assert_same_params(sharded, single)
  block = steps.state_sharding.params["backbone"]["blocks_0"]
  shapes = jax.tree.map(np.shape, sharded.params["backbone"]["blocks_0"])
  for path in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
    sharding = block[path[0]][path[1]]["kernel"]
    shape = shapes[path[0]][path[1]]["kernel"]  # e.g. qkv (32, 96)
    assert shd.FSDP_AXIS in sharding.spec, path
    assert np.prod(sharding.shard_shape(shape)) * 2 == np.prod(shape), path


def test_fsdp_spec_picks_largest_divisible_dim():
  assert shd.fsdp_spec((3, 3, 16, 64), 4) == jax.sharding.PartitionSpec(
      None, None, None, "fsdp")
  assert shd.fsdp_spec((6, 10), 4) == jax.sharding.PartitionSpec()  # none divides
  assert shd.fsdp_spec((), 2) == jax.sharding.PartitionSpec()


def test_batch_not_divisible_is_clear_error():
  mesh = shd.make_mesh(8)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    shd.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match="x 4 micro-batches"):
    shd.check_batch_size(16, mesh, micro_batches=4)
  assert shd.check_batch_size(32, mesh, micro_batches=4) == 32
  with pytest.raises(ValueError, match="must divide"):
    shd.make_mesh(8, fsdp=3)


def test_grad_accumulation_equals_large_batch():
  """With frozen BatchNorm, 4 micro-batches give the one-batch update."""
  mesh = shd.make_mesh(8)
  full, full_losses, _ = _train(mesh, _model(freeze_bn=True), num_steps=2)
  accum, accum_losses, _ = _train(mesh, _model(freeze_bn=True), num_steps=2,
                                  grad_accum_steps=2)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  _assert_same_params(accum, full)


def test_grad_accumulation_with_batchnorm_runs_per_micro_batch():
  """BatchNorm in training mode with 2 micro-batches (example i in
  micro-batch i % 2): after one step the running statistics are those of
  two direct BatchNorm updates from the initial state, micro-batch 0 then 1
  (not one update on the whole batch)."""
  model = _model()
  steps = jit_steps(model, optax.sgd(0.05, momentum=0.9), shd.make_mesh(8),
                    (1, SIZE, SIZE, 3), grad_accum_steps=2, **CLASSIFY)
  state = steps.init(jax.random.key(0))
  params, want = jax.device_get((state.params, state.batch_stats))
  update = jax.jit(lambda stats, images: model.apply(
      {"params": params, "batch_stats": stats}, images, train=True,
      mutable=["batch_stats"])[1]["batch_stats"])
  batch = _batch(0)
  for m in range(2):
    want = update(want, batch["image"][m::2])
  state, metrics = steps.train(state, shd.to_global(batch, steps.data_sharding),
                               jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  for got, ref in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_bfloat16_training_loss_finite_and_decreasing():
  mesh = shd.make_mesh(8)
  model = _model(dtype="bfloat16", head="gap")
  steps = jit_steps(model, optax.adam(3e-3), mesh, (1, SIZE, SIZE, 3), **CLASSIFY)
  state = steps.init(jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  batch = shd.to_global(_batch(0), steps.data_sharding)  # one batch, memorised
  losses = []
  for _ in range(12):
    state, metrics = steps.train(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state.batch_stats))
