r"""Full-model cost: ResNet-50 + BR-NPA train step and inference, JAX vs PyTorch.

  python -m benchmarks.train_step                       # the whole table
  python -m benchmarks.train_step --sizes 224 --res low --batch 8
  python -m benchmarks.train_step --sizes 224 --res low --batch 4 \
      --dtype bfloat16 --peers eager,compiled

For each input size (224, 448) and resolution (low: output stride 32, high:
8): images/s of the jitted train step (the trainer's step: forward,
cross-entropy, backward, SGD with momentum; state donated) and of inference,
compile time, the compiled program's memory (arguments + temporaries, from
XLA's memory analysis), achieved FLOP/s (FLOPs from XLA's cost analysis of
the lowered step) and its fraction of the machine's measured matmul peak
and, on GPUs with a published figure, of the published dense peak (MFU).
When torch is installed (requirements-bench.txt), the same architecture in
PyTorch runs beside it, run each way ``--peers`` names
(``benchmarks/torch_peer.py``: eager or ``torch.compile``, bfloat16
autocast with ``--dtype bfloat16``, channels-last, fused SGD), and the
ratios are printed. Then the head cost at high resolution: brnpa vs bcnn
vs gap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from brnpa_jax.models import BACKBONES, HEADS, STRIDES, Classifier
from brnpa_jax.tasks import classification
from brnpa_jax.train.state import create_state
from brnpa_jax.train.steps import make_predict_fn, make_train_step

NUM_CLASSES = 200
K = 3
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Dense (no sparsity) tensor-core peaks, FLOP/s, from NVIDIA's datasheets of
# the SXM parts: H200 and H100 989.4 TFLOP/s bfloat16, 494.7 TFLOP/s TF32;
# A100 312 / 156. float32 here means XLA's default precision, which runs
# float32 matmuls and convolutions as TF32 on these GPUs.
PUBLISHED_PEAK_FLOPS = {
    "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "H100 80GB HBM3": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def published_peak(device_kind: str, dtype: str) -> float | None:
  """The datasheet's dense peak of this device in ``dtype``, or None."""
  for name, peaks in PUBLISHED_PEAK_FLOPS.items():
    if name in device_kind:
      return peaks[dtype]
  return None


class ModelConfig(dict):
  """A config's ``model`` section as ``build_model`` reads it (attributes and
  ``get``) without ml_collections, which accelerator machines may lack."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


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


# -- the model and its steps ----------------------------------------------------------
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_saveable}


class RematBackbone(nn.Module):
  """The backbone under ``jax.checkpoint``: the backward pass recomputes what
  ``policy`` does not save (``dots``: convolution outputs are kept,
  BatchNorm and ReLU are recomputed), trading arithmetic for memory."""
  backbone: nn.Module
  policy: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    run = nn.remat(lambda mdl, x, train: mdl(x, train=train),
                   static_argnums=(2,), policy=self.policy)
    return run(self.backbone, x, train)


def build(head: str, res: str, dtype: str = "float32", *, remat: str | None = None,
          stage_sizes=None, width: int = 64, num_classes: int = NUM_CLASSES
          ) -> Classifier:
  """ResNet-50 (or ``stage_sizes`` Bottleneck stages at ``width``) + head."""
  dt = DTYPES[dtype]
  kwargs = dict(strides=STRIDES[res], width=width, dtype=dt)
  if stage_sizes:
    kwargs["stage_sizes"] = tuple(stage_sizes)
  backbone = BACKBONES["resnet50"](**kwargs)
  if remat:
    backbone = RematBackbone(backbone, REMAT_POLICIES[remat])
  head_module = (HEADS["brnpa"](num_maps=K, dtype=dt) if head == "brnpa"
                 else HEADS["bcnn"](num_maps=K, dtype=dt) if head == "bcnn"
                 else HEADS["gap"](dtype=dt))
  return Classifier(backbone=backbone, head=head_module,
                    num_classes=num_classes, dtype=dt)


def random_state(shapes, seed: int = 0):
  """A state of these shapes filled as a fresh initialisation fills it
  (He-normal kernels, unit BatchNorm scales and variances, zeros elsewhere),
  without compiling the initialiser: timings do not depend on the values."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "opt_state" not in name and name.endswith("['kernel']"):
      fan_in = int(np.prod(s.shape[:-1]))
      w = rng.standard_normal(s.shape, np.float32) * np.sqrt(2.0 / fan_in)
      return jnp.asarray(w, s.dtype)
    if "opt_state" not in name and name.endswith(("['scale']", "['var']")):
      return jnp.ones(s.shape, s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _loss(logits, aux, batch, context):
  del context
  return classification.loss_and_metrics(logits, aux, batch)


class JaxSetting:
  """One model at one input size and batch: its state, data and programs.

  ``train`` and ``infer`` compile (with optional XLA ``compiler_options``,
  e.g. ``{'xla_gpu_enable_latency_hiding_scheduler': True}``) and time; the
  state is donated to the train step and carried from call to call.
  """

  def __init__(self, head: str, size: int, res: str, batch: int,
               dtype: str = "float32", *, remat: str | None = None,
               stage_sizes=None, width: int = 64, num_classes: int = NUM_CLASSES):
    build_kw = dict(stage_sizes=stage_sizes, width=width, num_classes=num_classes)
    self.model = build(head, res, dtype, remat=remat, **build_kw)
    self.tx = optax.sgd(1e-3, momentum=0.9)
    self.batch = batch
    image_shape = (1, size, size, 3)
    self.state = random_state(jax.eval_shape(
        lambda r: create_state(self.model, self.tx, r, image_shape), jax.random.key(0)))
    self.data = {"image": jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
                 "label": jnp.zeros((batch,), jnp.int32)}
    self.rng = jax.random.key(2)
    self._train = jax.jit(make_train_step(self.model, self.tx, loss_fn=_loss),
                          donate_argnums=0)
    self._predict = jax.jit(make_predict_fn(self.model))
    self.lowered_train = self._train.lower(self.state, self.data, self.rng)
    # Model FLOPs: those of the step without rematerialisation (MFU counts
    # the model's arithmetic, not the recomputation).
    plain = self.lowered_train
    if remat:
      model = build(head, res, dtype, **build_kw)
      state = jax.eval_shape(lambda r: create_state(model, self.tx, r, image_shape),
                             jax.random.key(0))
      plain = jax.jit(make_train_step(model, self.tx, loss_fn=_loss)).lower(
          state, self.data, self.rng)
    self.train_flops = step_flops(plain)

  def train(self, iters: int, warmup: int = 1, compiler_options=None) -> dict:
    """Compiles and times the train step; returns its figures."""
    out = self.train_sets({"": compiler_options}, iters, warmup)[""]
    if "error" in out:
      raise RuntimeError(out["error"])
    return out

  def train_sets(self, option_sets: dict, iters: int, warmup: int = 1,
                 rounds: int = 1) -> dict:
    """The train step compiled under each of ``option_sets`` (name -> XLA
    options), then timed in ``rounds`` interleaved rounds of ``iters``
    steps each (so that drift hits every set alike); the medians. A set
    that fails to compile or run gets ``{'error': ...}``."""
    out, compiled = {}, {}
    for name, options in option_sets.items():
      try:
        t0 = time.perf_counter()
        compiled[name] = self.lowered_train.compile(compiler_options=options or None)
        mem = compiled[name].memory_analysis()
        out[name] = {"compile_s": time.perf_counter() - t0, "mib": (
            mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20}
      except Exception as e:  # pylint: disable=broad-except
        out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}

    def once(name):
      self.state, m = compiled[name](self.state, self.data, self.rng)
      jax.block_until_ready(m)

    times = {name: [] for name in compiled}
    for r in range(warmup + rounds):
      for name in list(compiled):
        try:
          if r < warmup:
            once(name)
          else:
            times[name].append(_timed(lambda: once(name), iters))
        except Exception as e:  # pylint: disable=broad-except
          out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
          del compiled[name]
    self.compiled_train = compiled
    for name in compiled:
      step_s = statistics.median(times[name])
      out[name].update(step_s=step_s, img_s=self.batch / step_s,
                       flops=self.train_flops,
                       flops_per_s=self.train_flops / step_s)
    return out

  def retime_train(self, iters: int, name: str = "") -> float:
    """Images/s of an already compiled train step (``train_sets``' name),
    timed again: for ratios against a peer measured just after."""
    def once():
      self.state, m = self.compiled_train[name](self.state, self.data, self.rng)
      jax.block_until_ready(m)
    return self.batch / _timed(once, iters)

  def retime_infer(self, iters: int) -> float:
    """Images/s of the inference compiled by ``infer``, timed again."""
    images = self.data["image"]
    return self.batch / _timed(
        lambda: jax.block_until_ready(self.compiled_infer(self.state, images)), iters)

  def infer(self, iters: int, warmup: int = 1, compiler_options=None) -> dict:
    """Compiles and times inference (probabilities and maps) on the batch."""
    images = self.data["image"]
    t0 = time.perf_counter()
    lowered = self._predict.lower(self.state, images)
    compiled = lowered.compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    flops = step_flops(lowered)
    self.compiled_infer = compiled
    once = lambda: jax.block_until_ready(compiled(self.state, images))
    for _ in range(warmup):
      once()
    step_s = _timed(once, iters)
    return {"step_s": step_s, "img_s": self.batch / step_s, "compile_s": compile_s,
            "flops": flops, "flops_per_s": flops / step_s}


def jax_figures(head, size, res, batch, iters, dtype="float32", setting=None,
                **kwargs) -> dict:
  """Train and inference figures of one setting (see ``JaxSetting``)."""
  setting = setting or JaxSetting(head, size, res, batch, dtype, **kwargs)
  train = setting.train(iters)
  infer = setting.infer(iters)
  return {"train": train["img_s"], "infer": infer["img_s"],
          "compile": train["compile_s"], "mib": train["mib"],
          "flops_per_s": train["flops_per_s"], "flops": train["flops"]}


# -- command line -----------------------------------------------------------------
def _torch_or_none(peers: list[str]):
  if not peers:
    return None
  try:
    from benchmarks import torch_peer  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("torch is not installed: PyTorch columns skipped "
          "(pip install -r requirements-bench.txt)")
    return None
  torch_peer.setup(len(os.sched_getaffinity(0)))
  return torch_peer


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="224,448")
  p.add_argument("--res", default="low,high")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--head_size", type=int, default=224,
                 help="input size of the head comparison (high resolution); 0: skip it")
  p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                 help="compute dtype of both sides (PyTorch: autocast)")
  p.add_argument("--peers", default="eager+nchw",
                 help="PyTorch ways, comma-separated: eager, compiled, max-autotune "
                      "(+nchw: without channels-last); empty: none")
  p.add_argument("--no_torch", action="store_true", help="same as --peers ''")
  args = p.parse_args()
  peers = [] if args.no_torch else [s for s in args.peers.split(",") if s]
  torch_peer = _torch_or_none(peers)
  if torch_peer is None:
    peers = []

  peak = matmul_peak_flops(dtype=args.dtype)
  kind = jax.devices()[0].device_kind
  published = published_peak(kind, args.dtype)
  print(f"jax {jax.__version__} on {kind}; {args.dtype} matmul peak (measured) "
        f"{peak / 1e9:.1f} GFLOP/s"
        + (f", published {published / 1e12:.0f} TFLOP/s" if published else "")
        + f"; compute dtype {args.dtype}; load average {os.getloadavg()[0]:.1f}"
        + (f"; {torch_peer.describe()}" if peers else ""))
  print(f"\nResNet-50 + BR-NPA (K={K}), batch {args.batch}, images/s "
        "(median of %d steps)" % args.iters)
  cols = "".join(f" {p[:12]:>12} {'ratio':>6}" for p in peers)
  print(f"{'size':>4} {'res':>4} | {'train':>7}{cols} | {'infer':>7}{cols} | "
        f"{'compile':>7} {'MiB':>7} {'GFLOP/s':>8} {'of peak':>7}"
        + (f" {'MFU':>6}" if published else ""))
  for size in map(int, args.sizes.split(",")):
    for res in args.res.split(","):
      setting = JaxSetting("brnpa", size, res, args.batch, args.dtype)
      r = jax_figures("brnpa", size, res, args.batch, args.iters, args.dtype,
                      setting=setting)
      train_cols = infer_cols = ""
      for peer in peers:
        spec = dict(head="brnpa", size=size, strides=STRIDES[res],
                    batch=args.batch, dtype=args.dtype, iters=args.iters)
        # Ours is timed again just before each peer: the ratio is side by
        # side even when a shared machine's speed drifts during compiles.
        ours = setting.retime_train(args.iters)
        t = torch_peer.train_figures(torch_peer.recipe(peer), **spec)["img_s"]
        ours_infer = setting.retime_infer(args.iters)
        i = torch_peer.infer_figures(torch_peer.recipe(peer), **spec)["img_s"]
        train_cols += f" {t:>12.2f} {ours / t:>5.2f}x"
        infer_cols += f" {i:>12.2f} {ours_infer / i:>5.2f}x"
      print(f"{size:>4} {res:>4} | {r['train']:>7.2f}{train_cols} | "
            f"{r['infer']:>7.2f}{infer_cols} | {r['compile']:>6.1f}s "
            f"{r['mib']:>7.0f} {r['flops_per_s'] / 1e9:>8.1f} "
            f"{r['flops_per_s'] / peak:>6.0%}"
            + (f" {r['flops_per_s'] / published:>5.1%}" if published else ""),
            flush=True)
  print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min); ratios "
        "use ours timed again just before each peer")

  if not args.head_size:
    return
  print(f"\nHead cost on ResNet-50, high resolution, {args.head_size}px, batch "
        f"{args.batch} (JAX train step)")
  print(f"{'head':<6} {'img/s':>7} {'vs bcnn':>8} {'MiB':>7} {'vs bcnn':>8}")
  rows = {h: jax_figures(h, args.head_size, "high", args.batch, args.iters,
                         args.dtype)
          for h in ("bcnn", "gap", "brnpa")}
  for head, r in rows.items():
    print(f"{head:<6} {r['train']:>7.2f} {r['train'] / rows['bcnn']['train']:>7.2f}x "
          f"{r['mib']:>7.0f} {r['mib'] / rows['bcnn']['mib']:>7.2f}x")


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
