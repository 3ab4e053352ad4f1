r"""Few-shot step cost: ResNet-12 + BR-NPA (or gap) at the real config shape.

  python -m benchmarks.fewshot_step                  # the real shape (GPU: ~1 min)
  python -m benchmarks.fewshot_step --width 16 --phases episodic --iters 1  # CPU

Times, side by side, for each head and resolution: the episodic train step
(one 5-way 5-shot 15-query episode, 100 images at 84 px, prototypical loss,
SGD with momentum), the pretraining step (cross-entropy on ``--batch`` base
images) and the evaluation of 600 5-way 5-shot episodes on precomputed
embeddings (one vmapped program). Random images and labels: no dataset
needed. Seconds are medians over ``--iters`` runs after a warm-up (the first
call compiles; its time is printed too). Ratios are against brnpa at high
resolution. On a CPU the real shape (width 64) takes minutes per step;
``--width 16`` (1/16 of the convolution FLOPs) gives the ratios in about a
minute of an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.train_step import ModelConfig, random_state
from brnpa_jax.data.fewshot import EpisodeSampler, episode_layout
from brnpa_jax.models import build_model
from brnpa_jax.tasks import prototypes as fewshot
from brnpa_jax.train.state import create_state

NUM_BASE = 64  # mini-ImageNet's base classes (CUB: 100; the cost barely moves)


def _median_seconds(fn, iters):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())  # compiles
  first = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), first


def step_seconds(args, head, res, episodic):
  """(median step seconds, first-call seconds) of one train step."""
  cfg = ModelConfig(
      backbone=args.backbone, res=res, head=head, num_maps=3, refine=True,
      init="norm", aux_heads=False, dropout=0.0, use_bias=True, width=args.width)
  model = build_model(cfg, NUM_BASE, args.dtype)
  tx = optax.sgd(1e-3, momentum=0.9)
  s = args.size
  state = random_state(jax.eval_shape(
      lambda r: create_state(model, tx, r, (1, s, s, 3)), jax.random.key(0)))
  if episodic:
    layout = episode_layout(args.ways, args.shots, args.queries)
    labels = jnp.asarray(layout)
  else:
    labels = jnp.arange(args.batch) % NUM_BASE
  images = jax.random.normal(jax.random.key(1), (len(labels), s, s, 3))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, images, labels):
    def loss_fn(params):
      (logits, aux), new = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images,
          train=True, mutable=["batch_stats"])
      if episodic:
        loss, _ = fewshot.prototypical_loss(
            aux["embedding"], labels, ways=args.ways, shots=args.shots,
            queries=args.queries)
      else:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new["batch_stats"]
    grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         batch_stats=stats, opt_state=opt_state)

  holder = {"state": state}

  def run():
    holder["state"] = step(holder["state"], images, labels)
    return holder["state"].params
  return _median_seconds(run, args.iters)


def episode_eval_seconds(args, dim):
  """Seconds to score 600 5-way 5-shot episodes on 3,000 embeddings."""
  labels = np.repeat(np.arange(50), 60)
  emb = jax.random.normal(jax.random.key(0), (len(labels), dim))
  sampler = EpisodeSampler(labels, args.ways, args.shots, args.queries, seed=0)
  eps = sampler.episodes(0, 600)  # drawn once, outside the timing
  fn = lambda: fewshot.episode_accuracies(emb, eps.support, eps.query)
  return _median_seconds(fn, args.iters)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backbone", default="resnet12")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--size", type=int, default=84)
  p.add_argument("--ways", type=int, default=5)
  p.add_argument("--shots", type=int, default=5)
  p.add_argument("--queries", type=int, default=15)
  p.add_argument("--batch", type=int, default=64, help="pretraining batch")
  p.add_argument("--heads", default="brnpa,gap")
  p.add_argument("--res", default="low,high")
  p.add_argument("--phases", default="episodic,pretrain")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (parameters stay float32)")
  args = p.parse_args()
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{args.backbone} width {args.width}, {args.size} px, episode "
        f"{args.ways}-way {args.shots}-shot {args.queries}-query "
        f"({args.ways * (args.shots + args.queries)} images), pretrain batch "
        f"{args.batch}, {args.dtype}")
  rows = []
  for phase in args.phases.split(","):
    for res in args.res.split(","):
      for head in args.heads.split(","):
        sec, first = step_seconds(args, head, res, phase == "episodic")
        n = (args.ways * (args.shots + args.queries) if phase == "episodic"
             else args.batch)
        rows.append((phase, head, res, sec, first, n / sec))
  print(f"\n{'phase':<9} {'head':<6} {'res':<5} {'s/step':>8} {'first s':>8} "
        f"{'img/s':>8} {'vs brnpa high':>14}")
  for phase, head, res, sec, first, ips in rows:
    ref = [r[3] for r in rows if r[0] == phase and r[1] == "brnpa"
           and r[2] == "high"]
    ratio = f"{sec / ref[0]:.2f}x" if ref else "-"
    print(f"{phase:<9} {head:<6} {res:<5} {sec:8.3f} {first:8.1f} {ips:8.1f} "
          f"{ratio:>14}")
  dim = 3 * round(640 * args.width / 64)
  sec, first = episode_eval_seconds(args, dim)
  print(f"\n600 episodes {args.ways}-way {args.shots}-shot, D={dim}, vmapped: "
        f"{sec * 1e3:.1f} ms (first call {first:.1f} s)")


if __name__ == "__main__":
  main()
