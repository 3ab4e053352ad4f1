r"""ConvNeXt's depthwise 7x7 convolution on the CPU: XLA's grouped convolution
against the zoo's shifted-slice sum (``brnpa_jax/models/conv.py``).

  python -m benchmarks.depthwise                       # width 10, 64 px, res high
  python -m benchmarks.depthwise --width 64 --size 224 --res low --batch 8

For each stage of ConvNeXt-T at the given width, input size and resolution,
times forward + backward (gradients for input and kernel) of one block's
depthwise convolution both ways, in one process, alternating the two
(medians of ``--iters`` calls, the best of ``--rounds``); the last row
weights each stage by its number of blocks (3, 3, 9, 3), which is what the
convolutions cost per train step.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.train_step import _timed
from brnpa_jax.models import convnext
from brnpa_jax.models.conv import conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")
PAD = ((3, 3), (3, 3))


def grids(width: int, size: int, res: str):
  """(blocks, (H, W, C)) of each ConvNeXt-T stage."""
  model = convnext.ConvNeXtTiny(width=width)
  strides = convnext.LOW_RES_STRIDES if res == "low" else convnext.HIGH_RES_STRIDES
  side, out = size // 4, []
  for i, (depth, c) in enumerate(zip(model.depths, model.channels)):
    if i:
      side //= strides[i - 1]
    out.append((depth, (side, side, c)))
  return out


def fwd_bwd(conv_fn):
  def loss(x, w):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    y = conv_fn(x, w, (1, 1), PAD, dimension_numbers=dn,
                feature_group_count=x.shape[-1])
    return jnp.sum(jnp.sin(y))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def timed(fn, x, w, iters: int) -> float:
  """Milliseconds per call after a compiling call: the median of ``iters``."""
  call = lambda: jax.block_until_ready(fn(x, w))
  call()
  return _timed(call, iters) * 1e3


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--width", type=int, default=10)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--res", choices=("low", "high"), default="high")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--rounds", type=int, default=2)
  a = p.parse_args()
  xla, ours = fwd_bwd(lax.conv_general_dilated), fwd_bwd(conv_general_dilated)
  print(f"ConvNeXt-T width {a.width}, {a.size} px, res {a.res}, batch {a.batch}, "
        f"{jax.devices()[0].device_kind}; fwd+bwd ms per convolution")
  print("| grid | blocks | XLA grouped conv | shifted sum | speed-up |")
  print("|---|---|---|---|---|")
  tot_x = tot_o = 0.0
  for depth, (h, w, c) in grids(a.width, a.size, a.res):
    x = jax.random.normal(jax.random.key(0), (a.batch, h, w, c))
    k = jax.random.normal(jax.random.key(1), (7, 7, 1, c)) * 0.05
    tx = to = float("inf")
    for _ in range(a.rounds):
      tx = min(tx, timed(xla, x, k, a.iters))
      to = min(to, timed(ours, x, k, a.iters))
    tot_x, tot_o = tot_x + depth * tx, tot_o + depth * to
    print(f"| {h}x{w}x{c} | {depth} | {tx:.1f} | {to:.1f} | {tx / to:.2f}x |")
  print(f"| all blocks | 18 | {tot_x:.0f} | {tot_o:.0f} | {tot_x / tot_o:.2f}x |")


if __name__ == "__main__":
  main()
