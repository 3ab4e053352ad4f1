r"""Re-id train step at the real shape: ResNet-50 + BR-NPA, 256x128 input.

  python -m benchmarks.reid_step                     # CPU: batch 2, one step
  python -m benchmarks.reid_step --batch 64          # the real P=16 x K=4 batch
  python -m benchmarks.reid_step --res reid_high high low --batch 64 --dtype bfloat16

One jitted step as ``configs/reid_market1501.py`` trains it: the ReIDNet
(backbone, BR-NPA K=3, BN-neck, 751-way bias-free classifier), cross-entropy
with label smoothing 0.1 + batch-hard triplet (margin 0.3) on a P x K batch
of random images, backward, Adam. Prints compile time, the median step time
over ``--steps`` steps after a warm-up (wall clock, and on CPU also the
process's CPU seconds, which a shared machine's load disturbs less),
images/s, XLA's FLOP count and memory
(arguments + temporaries) of the compiled step, and the step time scaled
linearly to the P x K = 64 batch when a smaller one was measured (an
extrapolation: it ignores the better device use of larger batches). Needs
only jax, flax, optax and this package (no dataset, no TensorFlow).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks.train_step import ModelConfig, random_state, step_flops
from brnpa_jax.models.registry import DTYPES
from brnpa_jax.models.reid import build_reid_model, reid_loss
from brnpa_jax.models import BACKBONES, STRIDES

REAL_BATCH = 64  # P=16 identities x K=4 images
NUM_CLASSES = 751  # Market-1501 training identities


def make_step(model, tx):
  """``step(params, batch_stats, opt_state, images, labels)``, donating state."""

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(p):
      (logits, aux), new = model.apply(
          {"params": p, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss, metrics = reid_loss(logits, aux, labels)
      return loss, (metrics, new["batch_stats"])

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1, 2))


def measure(res: str, batch: int, steps: int, dtype: str, backbone: str,
            size: tuple[int, int] = (256, 128), width: int = 0) -> dict:
  """Compile and time one setting; returns its figures."""
  model = build_reid_model(ModelConfig(
      backbone=backbone, width=width, res=res, head="brnpa", num_maps=3,
      refine=True, init="norm", aux_heads=False, dropout=0.0, use_bias=False,
      zero_init_residual=False, freeze_bn=False), NUM_CLASSES, dtype)
  k = 4 if batch % 4 == 0 and batch >= 8 else 2
  images = jax.random.normal(jax.random.key(1), (batch, *size, 3))
  labels = jnp.arange(batch) // k  # P = batch / K identities, K images each
  variables = random_state(jax.eval_shape(model.init, jax.random.key(0),
                                          images[:1]))
  tx = optax.adam(3.5e-4)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  step = make_step(model, tx)
  t0 = time.perf_counter()
  lowered = step.lower(params, batch_stats, opt_state, images, labels)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state = (params, batch_stats, opt_state)
  times, cpu_times = [], []
  for i in range(steps + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    *state, metrics = compiled(*state, images, labels)
    jax.block_until_ready(metrics)
    if i:  # the first call is the warm-up
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
  step_s = statistics.median(times)
  return {
      "res": res, "batch": batch, "compile_s": compile_s, "step_s": step_s,
      "cpu_s": statistics.median(cpu_times),
      "img_per_s": batch / step_s, "gflop": step_flops(lowered) / 1e9,
      "gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30,
      "step_s_at_64": step_s * REAL_BATCH / batch,
      "loss": float(metrics["loss"]),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--res", nargs="+", default=["reid_high"], choices=list(STRIDES))
  parser.add_argument("--batch", type=int, default=0,
                      help="images per step (default: 2 on CPU, 64 otherwise)")
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps after the warm-up (default: 1 on CPU, 5 otherwise)")
  parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
  parser.add_argument("--backbone", default="resnet50", choices=list(BACKBONES))
  args = parser.parse_args()
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  batch = args.batch or (2 if on_cpu else REAL_BATCH)
  steps = args.steps or (1 if on_cpu else 5)
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"{args.backbone} + BR-NPA K=3, 256x128, {args.dtype}")
  header = (f"{'res':<10}{'batch':>6}{'compile s':>11}{'s/step':>9}"
            f"{'cpu s/step':>11}{'img/s':>8}{'GFLOP':>9}{'GiB':>7}{'s/step @64':>12}")
  print(header)
  for res in args.res:
    r = measure(res, batch, steps, args.dtype, args.backbone)
    scaled = f"{r['step_s_at_64']:.2f}" + ("" if batch == REAL_BATCH else " (x)")
    cpu = f"{r['cpu_s']:.2f}" if on_cpu else "-"
    print(f"{res:<10}{batch:>6}{r['compile_s']:>11.1f}{r['step_s']:>9.3f}"
          f"{cpu:>11}{r['img_per_s']:>8.2f}{r['gflop']:>9.0f}{r['gib']:>7.2f}"
          f"{scaled:>12}", flush=True)
  if batch != REAL_BATCH:
    print("(x): extrapolated linearly from the measured batch.")


if __name__ == "__main__":
  main()
