r"""What XLA:CPU settings do to the ResNet-50 + BR-NPA train step.

  python -m benchmarks.cpu_flags                  # 224 px, low res, batch 4
  python -m benchmarks.cpu_flags --size 448 --res high --batch 2

Each setting (XLA flags, compute dtype, or the zoo's 1x1 convolutions left
as XLA:CPU convolutions instead of matmuls) runs ``benchmarks.train_step``'s JAX
measurement in a fresh process (XLA reads its flags once per process); eager
PyTorch on the same model is measured in this process before and after the
settings, and every ratio uses their mean, so drift of a shared machine shows
as the spread of the two PyTorch figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from brnpa_jax.models import STRIDES

# (name, XLA flags, compute dtype, 1x1 convolutions as matmuls). Without the
# last, the zoo's 1x1-convolutions-as-matmuls (brnpa_jax/models/conv.py) is
# off in that process: what the step costs with XLA:CPU's own convolution for
# every layer.
SETTINGS = [
    ("baseline", "", "float32", True),
    ("1x1 as convolutions", "", "float32", False),
    ("oneDNN", "--xla_cpu_use_onednn=true", "float32", True),
    ("XNNPACK", "--xla_cpu_use_xnnpack=true", "float32", True),
    ("fast math", "--xla_cpu_enable_fast_math=true", "float32", True),
    ("512-bit vectors", "--xla_cpu_prefer_vector_width=512", "float32", True),
    ("bfloat16 compute", "", "bfloat16", True),
]

_CHILD = """
import json, sys
from benchmarks.train_step import jax_figures
size, res, batch, iters, dtype, matmul_1x1 = sys.argv[1:7]
if matmul_1x1 == "0":
  from brnpa_jax.models import conv
  conv._pointwise = lambda *args: False
r = jax_figures("brnpa", int(size), res, int(batch), int(iters), dtype)
print("RESULT " + json.dumps(dict(train=r["train"], infer=r["infer"],
                                  compile=r["compile"], mib=r["mib"],
                                  flops=r["flops_per_s"])))
"""


def run_setting(flags, dtype, matmul_1x1, args):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)
  out = subprocess.run(
      [sys.executable, "-c", _CHILD, str(args.size), args.res, str(args.batch),
       str(args.iters), dtype, str(int(matmul_1x1))], env=env, capture_output=True, text=True,
      check=False)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:120]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--res", default="low")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args()
  try:
    from benchmarks import torch_peer  # pylint: disable=import-outside-toplevel
    torch_peer.setup(len(os.sched_getaffinity(0)))
  except ImportError:
    torch_peer = None
    print("torch is not installed: no PyTorch reference (requirements-bench.txt)")

  def eager_torch():
    return torch_peer.train_figures(
        torch_peer.recipe("eager+nchw"), head="brnpa", size=args.size,
        strides=STRIDES[args.res], batch=args.batch, dtype="float32",
        iters=args.iters)["img_s"]

  ref = [eager_torch()] if torch_peer else []
  rows = [(name, flags, dtype, run_setting(flags, dtype, matmul_1x1, args))
          for name, flags, dtype, matmul_1x1 in SETTINGS]
  if torch_peer:
    ref.append(eager_torch())
  torch_ips = sum(ref) / len(ref) if ref else float("nan")
  print(f"ResNet-50 + BR-NPA train step, {args.size}px {args.res} res, batch "
        f"{args.batch}, {os.cpu_count()} CPU cores; eager PyTorch "
        + (" / ".join(f"{r:.2f}" for r in ref) + " img/s (before / after)"
           if ref else "not measured"))
  print(f"{'setting':<20} {'dtype':<9} | {'img/s':>6} {'vs torch':>8} "
        f"{'vs base':>7} | {'compile':>7} {'MiB':>6}")
  base = rows[0][3].get("train")
  for name, _, dtype, r in rows:
    if "error" in r:
      print(f"{name:<20} {dtype:<9} | failed: {r['error']}")
      continue
    print(f"{name:<20} {dtype:<9} | {r['train']:>6.2f} "
          f"{r['train'] / torch_ips:>7.2f}x {r['train'] / base:>6.2f}x | "
          f"{r['compile']:>6.1f}s {r['mib']:>6.0f}", flush=True)


if __name__ == "__main__":
  main()
