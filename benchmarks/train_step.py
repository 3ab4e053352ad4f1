r"""Full-model cost: ResNet-50 + BR-NPA train step and inference, JAX vs PyTorch.

  python -m benchmarks.train_step                       # the whole table
  python -m benchmarks.train_step --sizes 224 --res low --batch 8

For each input size (224, 448) and resolution (low: output stride 32, high:
8): images/s of the jitted train step (forward, cross-entropy, backward, SGD
with momentum) and of inference, compile time, the compiled program's memory
(arguments + temporaries, from XLA's memory analysis), achieved FLOP/s from
XLA's cost analysis and its fraction of the machine's measured matmul peak.
When torch is installed (requirements-bench.txt), the same architecture in
eager PyTorch (``benchmarks/torch_models.py``, with the reference-style BR-NPA
operator of ``benchmarks/operator.py``) runs beside it and the ratio is
printed. Then the head cost at high resolution: brnpa vs bcnn vs gap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from brnpa_jax.models import STRIDES, build_model
from brnpa_jax.train import sharding as shd
from brnpa_jax.train.steps import jit_steps

NUM_CLASSES = 200
K = 3


def matmul_peak_flops(n: int = 0, iters: int = 10, dtype="float32") -> float:
  """This machine's matmul rate in ``dtype``: the 'peak' fractions refer to.

  On a GPU, float32 matmuls run as XLA's default precision does (TF32 on
  NVIDIA tensor cores), as the model's convolutions do.
  """
  n = n or (8192 if jax.default_backend() == "gpu" else 2048)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(iters):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def step_flops(lowered) -> float:
  """FLOPs of one step from XLA's cost analysis of the lowered (unoptimised)
  program: the model's arithmetic, the same on every backend. (The compiled
  program's analysis misses work done in library calls, e.g. cuDNN
  convolutions on a GPU.)"""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def _timed(fn, iters):
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def jax_figures(head, size, res, batch, iters, dtype="float32"):
  """(train img/s, infer img/s, compile s, MiB, train FLOP/s) for one setting."""
  cfg = ml_collections.ConfigDict(dict(
      backbone="resnet50", res=res, head=head, num_maps=K, refine=True,
      init="norm", aux_heads=False, dropout=0.0, use_bias=True))
  model = build_model(cfg, NUM_CLASSES, dtype)
  mesh = shd.make_mesh(1)
  steps = jit_steps(model, optax.sgd(1e-3, momentum=0.9), mesh, (1, size, size, 3))
  state = steps.init(jax.random.key(0))
  data = {"image": jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
          "label": jnp.zeros((batch,), jnp.int32)}
  rng = jax.random.key(2)
  t0 = time.perf_counter()
  lowered = steps.train.lower(state, data, rng)
  train = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = train.memory_analysis()
  mib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20
  flops = step_flops(lowered)
  holder = {"state": train(state, data, rng)[0]}  # warm-up

  def train_once():
    holder["state"], m = train(holder["state"], data, rng)
    jax.block_until_ready(m)

  t_train = _timed(train_once, iters)
  predict = steps.predict.lower(holder["state"], data["image"]).compile()
  jax.block_until_ready(predict(holder["state"], data["image"]))
  t_infer = _timed(lambda: jax.block_until_ready(
      predict(holder["state"], data["image"])), iters)
  return batch / t_train, batch / t_infer, compile_s, mib, flops / t_train


def torch_figures(head, size, res, batch, iters):
  """(train img/s, infer img/s) of the same model in eager PyTorch."""
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_models  # pylint: disable=import-outside-toplevel
  from benchmarks.operator import _torch_device, _torch_sync, torch_brnpa  # pylint: disable=import-outside-toplevel

  dev = _torch_device()
  sync = lambda: _torch_sync(None)
  strides = STRIDES[res]
  pool = ((lambda f: torch_brnpa(f, K)[0]) if head == "brnpa"
          else torch_models.gap_pool)
  model = torch_models.Classifier(torch_models.ResNet(strides=strides), pool,
                                  K if head == "brnpa" else 1, NUM_CLASSES).to(dev)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  x = torch.randn(batch, 3, size, size, device=dev)
  y = torch.zeros(batch, dtype=torch.long, device=dev)

  def train_once():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sync()

  model.train()
  train_once()
  t_train = _timed(train_once, iters)
  model.eval()
  with torch.no_grad():
    model(x)
    sync()
    t_infer = _timed(lambda: (model(x), sync()), iters)
  return batch / t_train, batch / t_infer


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="224,448")
  p.add_argument("--res", default="low,high")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--head_size", type=int, default=224,
                 help="input size of the head comparison (high resolution); 0: skip it")
  p.add_argument("--dtype", default="float32", help="JAX compute dtype")
  p.add_argument("--no_torch", action="store_true")
  args = p.parse_args()
  threads = os.cpu_count()
  try:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    have_torch = not args.no_torch
  except ImportError:
    have_torch = False
    print("torch is not installed: PyTorch columns skipped "
          "(pip install -r requirements-bench.txt)")

  peak = matmul_peak_flops(dtype=args.dtype)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"{args.dtype} matmul peak (measured) {peak / 1e9:.1f} GFLOP/s; "
        f"JAX compute dtype {args.dtype}, PyTorch float32"
        + (f"; torch {torch.__version__} with {threads} threads" if have_torch else ""))
  print(f"\nResNet-50 + BR-NPA (K={K}), batch {args.batch}, images/s "
        "(median of %d steps)" % args.iters)
  print(f"{'size':>4} {'res':>4} | {'train':>7} {'torch':>7} {'ratio':>6} | "
        f"{'infer':>7} {'torch':>7} {'ratio':>6} | {'compile':>7} {'MiB':>7} "
        f"{'GFLOP/s':>8} {'of peak':>7}")
  for size in map(int, args.sizes.split(",")):
    for res in args.res.split(","):
      tr, inf, comp, mib, fl = jax_figures("brnpa", size, res, args.batch,
                                           args.iters, args.dtype)
      ttr, tinf = (torch_figures("brnpa", size, res, args.batch, args.iters)
                   if have_torch else (float("nan"),) * 2)
      print(f"{size:>4} {res:>4} | {tr:>7.2f} {ttr:>7.2f} {tr / ttr:>5.2f}x | "
            f"{inf:>7.2f} {tinf:>7.2f} {inf / tinf:>5.2f}x | {comp:>6.1f}s "
            f"{mib:>7.0f} {fl / 1e9:>8.1f} {fl / peak:>6.0%}", flush=True)

  if not args.head_size:
    return
  print(f"\nHead cost on ResNet-50, high resolution, {args.head_size}px, batch "
        f"{args.batch} (JAX train step)")
  print(f"{'head':<6} {'img/s':>7} {'vs bcnn':>8} {'MiB':>7} {'vs bcnn':>8}")
  rows = {h: jax_figures(h, args.head_size, "high", args.batch, args.iters,
                         args.dtype)
          for h in ("bcnn", "gap", "brnpa")}
  for head, (tr, _, _, mib, _) in rows.items():
    print(f"{head:<6} {tr:>7.2f} {tr / rows['bcnn'][0]:>7.2f}x {mib:>7.0f} "
          f"{mib / rows['bcnn'][3]:>7.2f}x")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
