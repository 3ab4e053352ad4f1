r"""Deletion metric: batched jitted forwards vs one jitted forward per step.

  python -m benchmarks.deletion                   # under a minute on 2 CPU cores
  python -m benchmarks.deletion --preset paper    # ResNet-50, 448 px, 56x56 (CPU: minutes)
  python -m benchmarks.deletion --preset paper --device-run   # on a GPU
  python -m benchmarks.deletion --preset paper --device-run --dtype bfloat16

Times, per image, the deletion metric of ``brnpa_jax.explain.metrics`` in
two ways measured side by side in one run, for both protocols:

- batched: ``PerturbationCurves`` (perturbed images built on the device from a
  rank map and a threshold, ``--chunk`` of them per forward);
- loop: the reference's way, one jitted forward of one perturbed image per
  step, reading the probability back each step (the same jitted perturbation
  and model, batch 1).

Release protocol: one step per cell of the high-resolution feature map
(default: resnet18 width 16 at 64 px, 8x8 = 64 steps; paper: ResNet-50 at
448 px, 56x56 = 3,136 steps). Standard protocol: one step per image width
of pixels (224 px per step on a 224x224 image), plus the unperturbed point.
Random images and a randomly initialised model: the timing does not depend
on the weights. ``--dtype bfloat16`` runs the forwards in bfloat16
(parameters stay float32; logits are cast to float32 before the softmax).
When ``--time_steps`` is below the number of steps (the
paper preset on a CPU, where the loop way takes about 50 minutes per image),
each way runs only that many steps and the time is extrapolated linearly;
the table says so.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import random_state
from brnpa_jax.explain import metrics
from brnpa_jax.models import BACKBONES, STRIDES, Classifier
from brnpa_jax.models.heads import BRNPAHead

PRESETS = {
    "default": dict(backbone="resnet18", width=16, size=64, images=4, chunk=16,
                    time_steps=0, rounds=3),
    "paper": dict(backbone="resnet50", width=64, size=448, images=1, chunk=8,
                  time_steps=8, rounds=1),
}
# On an accelerator the paper preset runs every batched step and 256 loop steps.
DEVICE_RUN = dict(images=2, chunk=64, time_steps=0, loop_steps=256, rounds=1)


def build(backbone: str, width: int, size: int, dtype: str = "float32",
          stage_sizes=None):
  """A randomly initialised high-resolution BR-NPA classifier (no config or
  data libraries needed) computing in ``dtype``."""
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  kwargs = {"stage_sizes": tuple(stage_sizes)} if stage_sizes else {}
  model = Classifier(
      backbone=BACKBONES[backbone](strides=STRIDES["high"], width=width,
                                   dtype=dt, **kwargs),
      head=BRNPAHead(num_maps=3, dtype=dt), num_classes=200, dtype=dt)
  variables = random_state(jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((1, size, size, 3))), jax.random.key(0)))
  apply_fn = lambda v, x: model.apply(v, x, train=False)[0]
  return apply_fn, variables


def _inputs(curves, variables, images, saliency, protocol):
  """Starts, ends, rank maps, thresholds and classes of the deletion curve."""
  size = images.shape[1:3]
  if protocol == "release":
    ranks, thresholds = metrics.release_order(saliency, size, None)
  else:
    ranks, thresholds = metrics.standard_order(saliency, size, None)
  classes = curves.predicted_classes(variables, images)
  return images, jnp.zeros_like(images), ranks, thresholds, classes


def time_batched(curves, variables, inputs, steps):
  starts, ends, ranks, thresholds, classes = inputs
  t0 = time.perf_counter()
  out = curves.curves(variables, starts, ends, ranks, thresholds[:steps], classes)
  assert np.isfinite(out).all()
  return time.perf_counter() - t0


def time_loop(single, variables, inputs, steps):
  starts, ends, ranks, thresholds, classes = inputs
  t0 = time.perf_counter()
  for b in range(ranks.shape[0]):
    idx = np.full((1,), b, np.int32)
    for k in thresholds[:steps]:
      p = float(single(variables, starts, ends, ranks, classes, idx,
                       np.full((1,), k, np.int32))[0])
      assert np.isfinite(p)
  return time.perf_counter() - t0


def measure(opts: dict, dtype: str = "float32") -> list[dict]:
  """Both protocols, batched vs loop; one dict per protocol (see module doc)."""
  apply_fn, variables = build(opts["backbone"], opts["width"], opts["size"],
                              dtype, opts.get("stage_sizes"))
  curves = metrics.PerturbationCurves(apply_fn, chunk_size=opts["chunk"])
  single = jax.jit(lambda *a: metrics.perturbed_probs(apply_fn, *a))
  rng = np.random.default_rng(0)
  size, n = opts["size"], opts["images"]
  images = jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32)
  h = size // 8  # high resolution: output stride 8
  saliency = jnp.asarray(rng.uniform(size=(n, h, h)), jnp.float32)
  rows = []
  for protocol in ("release", "standard"):
    inputs = _inputs(curves, variables, images, saliency, protocol)
    total = len(inputs[3])
    steps = opts["time_steps"] or total
    loop_steps = min(opts["loop_steps"] or steps, steps)
    # Warm-up compiles both functions (one chunk, one step).
    t0 = time.perf_counter()
    time_batched(curves, variables, inputs, min(opts["chunk"], total))
    time_loop(single, variables, inputs, 1)
    first_s = time.perf_counter() - t0
    ratios, bt, lt = [], [], []
    for _ in range(opts["rounds"]):
      b = time_batched(curves, variables, inputs, steps) * total / steps / n
      l = time_loop(single, variables, inputs, loop_steps) * total / loop_steps / n
      bt.append(b), lt.append(l), ratios.append(l / b)
    note = ""
    if steps < total or loop_steps < total:
      note = (f"batched {steps}/{total} steps, loop {loop_steps}/{total} steps,"
              " extrapolated")
    rows.append(dict(protocol=protocol, forwards=total,
                     batched_s=float(np.median(bt)), loop_s=float(np.median(lt)),
                     ratio=float(np.median(ratios)), first_s=first_s, note=note))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="default")
  p.add_argument("--device-run", action="store_true",
                 help="on an accelerator: every batched step, 256 loop steps")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of the model's forwards")
  for name in ("backbone",):
    p.add_argument(f"--{name}")
  for name in ("width", "size", "images", "chunk", "time_steps", "loop_steps",
               "rounds"):
    p.add_argument(f"--{name}", type=int)
  args = p.parse_args()
  opts = dict(PRESETS[args.preset], loop_steps=None)
  if args.device_run:
    if jax.default_backend() == "cpu":
      raise SystemExit("--device-run needs a GPU or TPU; jax sees only the CPU.")
    opts.update(DEVICE_RUN)
  opts.update({k: v for k, v in vars(args).items()
               if k in opts and v is not None})
  h = opts["size"] // 8
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{opts['backbone']} width {opts['width']} at {opts['size']} px, high "
        f"resolution ({h}x{h} cells), {opts['images']} images, chunk "
        f"{opts['chunk']}, {args.dtype}")
  rows = measure(opts, args.dtype)
  print("\n| protocol | forwards/image | batched s/image | loop s/image | "
        "loop / batched | note |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['protocol']} | {r['forwards']} | {r['batched_s']:.3f} | "
          f"{r['loop_s']:.3f} | **{r['ratio']:.1f}x** | {r['note']} |")
  print(f"\nMedians of {opts['rounds']} interleaved round(s); ratios per round, "
        "then the median.")


if __name__ == "__main__":
  main()
