r"""Foundation figures: dataset generation, compile time, per-head step cost.

  python -m benchmarks.foundation [--backbone resnet18 --width 16 --size 64]

Prints one table, measured side by side in this run: procedural generation
per example; compile time of the tiny test model; and, for the default
backbone at high resolution, the jitted train step of each head (gap, bcnn,
brnpa): images/s, compile seconds and the compiled step's temporary memory.
Ratios are against ``bcnn``, the parametric attention baseline.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from brnpa_jax.data import parts
from brnpa_jax.models import build_model
from brnpa_jax.train.state import create_state
from brnpa_jax.train.steps import make_train_step


def _model_cfg(backbone, width, head):
  return ml_collections.ConfigDict(dict(
      backbone=backbone, width=width, res="high", head=head, num_maps=3,
      refine=True, init="norm", aux_heads=False, dropout=0.0, use_bias=True,
      zero_init_residual=True))


def time_step(backbone, width, head, size, batch, iters):
  model = build_model(_model_cfg(backbone, width, head), num_classes=10)
  tx = optax.sgd(0.01, momentum=0.9)
  state = jax.jit(lambda r: create_state(model, tx, r, (1, size, size, 3)))(
      jax.random.key(0))
  step = jax.jit(make_train_step(model, tx), donate_argnums=0)
  data = {"image": jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
          "label": jnp.zeros((batch,), jnp.int32)}
  rng = jax.random.key(2)
  t0 = time.perf_counter()
  compiled = step.lower(state, data, rng).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp_mb = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else float("nan")
  state, _ = compiled(state, data, rng)  # warm-up
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(iters):
    state, _ = compiled(state, data, rng)
  jax.block_until_ready(state)
  return batch * iters / (time.perf_counter() - t0), compile_s, temp_mb


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--backbone", default="resnet18")
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args()

  cfg = parts.PartsConfig()
  t0 = time.perf_counter()
  parts.generate_split(cfg, "train", 500)
  gen_ms = (time.perf_counter() - t0) / 500 * 1e3
  t0 = time.perf_counter()
  _, tiny_compile, _ = time_step("resnet_tiny", 8, "brnpa", 32, 8, 1)
  tiny_total = time.perf_counter() - t0

  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
  print(f"parts generation: {gen_ms:.2f} ms / {cfg.image_size}px example "
        f"({6000 * gen_ms / 1e3:.1f} s for the default 6,000 train images)")
  print(f"resnet_tiny train step: compile {tiny_compile:.1f} s, "
        f"build+compile+run {tiny_total:.1f} s")
  print(f"\n{args.backbone} width {args.width}, high res, {args.size}px, "
        f"batch {args.batch}, train step")
  print(f"{'head':<6} {'img/s':>8} {'vs bcnn':>8} {'compile s':>10} "
        f"{'temp MiB':>9} {'vs bcnn':>8}")
  rows = {h: time_step(args.backbone, args.width, h, args.size, args.batch,
                       args.iters) for h in ("bcnn", "gap", "brnpa")}
  for head, (ips, comp, mem) in rows.items():
    print(f"{head:<6} {ips:>8.1f} {ips / rows['bcnn'][0]:>7.2f}x {comp:>10.1f} "
          f"{mem:>9.1f} {mem / rows['bcnn'][2]:>7.2f}x")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
