r"""Backbone cost side by side: ResNet-18 vs ConvNeXt vs ViT under BR-NPA.

  python -m benchmarks.backbones                 # the comparison's models
  python -m benchmarks.backbones --batch 32 --rounds 3

The models of ``docs/backbones.md``'s comparison (``configs/default.py``,
64 px, ``res=high`` unless a row says otherwise; an 8x8 grid for each): the
three of about 0.7 M parameters, then the small-image variants of the
from-scratch recipe. Their parameters, compile time,
FLOPs per image (XLA's cost analysis of the lowered train step), and
images/s of the jitted train step (AdamW, as the default config) and of
inference, in one process. Timings are medians of ``--iters`` steps; the
models take turns in ``--rounds`` rounds, and the ratios to ResNet-18 are
per round, then the median, so that load from other processes on a shared
machine weighs on every model alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks.train_step import _timed, step_flops
from brnpa_jax.models import build_model
from brnpa_jax.tasks import classification
from brnpa_jax.train import sharding as shd
from brnpa_jax.train.steps import jit_steps

# (label, backbone, width[, other model fields]): ~0.7 M backbone parameters
# each, then the small-image variants of docs/backbones.md's recipe.
MODELS = (("ResNet-18", "resnet18", 16),
          ("ConvNeXt-T", "convnext_tiny", 10),
          ("ViT-Ti/16", "vit_tiny_patch16_224", 22),
          ("ConvNeXt-T conv stem", "convnext_tiny", 10, {"stem": "conv"}),
          ("ViT-Ti/8 conv stem", "vit_tiny_patch16_224", 22,
           {"stem": "conv", "patch_size": 8, "img_size": 64, "res": "low"}))
NUM_CLASSES = 10


class Bench:
  """One model's jitted train and predict steps, ready to time."""

  def __init__(self, backbone: str, width: int, size: int, batch: int,
               fields: dict | None = None):
    cfg = ml_collections.ConfigDict(dict(
        backbone=backbone, width=width, res="high", head="brnpa", num_maps=3,
        refine=True, init="norm", aux_heads=False, dropout=0.0, use_bias=True,
        zero_init_residual=True, **(fields or {})))
    model = build_model(cfg, NUM_CLASSES)
    steps = jit_steps(model, optax.adamw(1e-3), shd.make_mesh(1),
                      (1, size, size, 3), loss_fn=classification.loss_and_metrics)
    self.state = steps.init(jax.random.key(0))
    self.params = sum(int(np.prod(p.shape)) for p in
                      jax.tree.leaves(self.state.params["backbone"]))
    self.data = {"image": jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
                 "label": jnp.zeros((batch,), jnp.int32)}
    self.rng = jax.random.key(2)
    t0 = time.perf_counter()
    lowered = steps.train.lower(self.state, self.data, self.rng)
    self.train = lowered.compile()
    self.predict = steps.predict.lower(self.state, self.data["image"]).compile()
    self.compile_s = time.perf_counter() - t0
    self.gflop_per_image = step_flops(lowered) / batch / 1e9
    self.batch = batch
    self.step_train()  # warm-up
    jax.block_until_ready(self.predict(self.state, self.data["image"]))

  def step_train(self):
    self.state, m = self.train(self.state, self.data, self.rng)
    jax.block_until_ready(m)

  def rates(self, iters: int) -> tuple[float, float]:
    """(train, inference) images/s, medians of ``iters`` calls."""
    t_train = _timed(self.step_train, iters)
    t_infer = _timed(lambda: jax.block_until_ready(
        self.predict(self.state, self.data["image"])), iters)
    return self.batch / t_train, self.batch / t_infer


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"{args.size} px, batch {args.batch}, res=high, BR-NPA K=3, float32")
  benches = {label: Bench(bb, w, args.size, args.batch, *fields)
             for label, bb, w, *fields in MODELS}
  rates = {label: [] for label in benches}
  for _ in range(args.rounds):
    for label, bench in benches.items():
      rates[label].append(bench.rates(args.iters))
  base = MODELS[0][0]
  print(f"\n{'model':<20} {'width':>5} {'params':>8} {'GFLOP/img':>9} "
        f"{'compile':>8} | {'train img/s':>11} {'vs ' + base:>13} | "
        f"{'infer img/s':>11} {'vs ' + base:>13}")
  for (label, _, width, *_), bench in zip(MODELS, benches.values()):
    tr = statistics.median(r[0] for r in rates[label])
    inf = statistics.median(r[1] for r in rates[label])
    tr_ratio = statistics.median(a[0] / b[0] for a, b in zip(rates[label], rates[base]))
    inf_ratio = statistics.median(a[1] / b[1] for a, b in zip(rates[label], rates[base]))
    print(f"{label:<20} {width:>5} {bench.params / 1e6:>7.2f}M "
          f"{bench.gflop_per_image:>9.3f} {bench.compile_s:>7.1f}s | "
          f"{tr:>11.1f} {tr_ratio:>12.2f}x | {inf:>11.1f} {inf_ratio:>12.2f}x",
          flush=True)


if __name__ == "__main__":
  main()
