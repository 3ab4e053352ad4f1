r"""Operator benchmark: BR-NPA alone, our JAX operator vs eager PyTorch.

  python -m benchmarks.operator                 # the whole table, ~1 minute
  python -m benchmarks.operator --sizes 56 --rounds 2
  git show main:brnpa_jax/attention/brnpa.py > /tmp/brnpa_main.py
  python -m benchmarks.operator --no_torch --against /tmp/brnpa_main.py

For K=3 maps on (B=8, S x S x 2048) float32 features (S = 14, 56): ms per
call of the forward and of forward+backward (the gradient of
``sum(vectors * cotangent)`` w.r.t. the features), for our jitted operator
and for a PyTorch port written the way the authors' release writes it
(``benchmarks.torch_models.torch_brnpa``: NCHW, per-round gathers, broadcast
products summed over channels, eager, no ``torch.compile``). Both are
checked to give the same vectors and gradients before anything is timed.

The same run measures this machine's memory bandwidth and prints what the
operator achieves against the memory-traffic bound (see ``_traffic``). All
measurements are interleaved over ``--rounds`` rounds; every ratio is taken
within a round and the median over rounds is printed, because the
bandwidth of a shared machine drifts by 2x over seconds.

A second table gives the autodiff modes of our operator: forward, forward
mode (``jax.jvp`` of the vectors along a random tangent) and forward+backward;
with ``--against FILE`` (another version of ``brnpa_jax/attention/brnpa.py``,
loaded from that file) it also times that version's forward and
forward+backward in the same rounds and prints the per-round ratios, so a
change to the operator is measured side by side on a shared machine.

PyTorch is optional (``pip install -r requirements-bench.txt``); without it
the PyTorch columns are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax import brnpa

try:
  import torch

  from benchmarks.torch_models import device as _torch_device
  from benchmarks.torch_models import sync as _torch_sync
  from benchmarks.torch_models import torch_brnpa
except ImportError:  # optional: only the PyTorch column needs it
  torch = None

K = 3


def _median_ms(fn, iters: int) -> float:
  fn()  # warm-up (and compilation, for jitted functions)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    del out  # freeing the result is not part of the call
  return statistics.median(times) * 1e3


def _traffic(x_bytes: int, k: int) -> dict:
  """Minimum DRAM bytes (read, written) of each pass, and ours.

  Minimum: the forward needs the norms before the first selection and each
  round's similarities before the next selection, so K + 1 reads (each
  refined vector can be accumulated in its round's read). For the gradient,
  sum_i (dL/da_ki) a_ki = <g_k, v_k> + <dL/dA_k, a_k> comes from the
  forward's outputs, after which every term of the gradient is per row,
  except the K selected rows' sums, which accumulate in the same pass: one
  more read and the write. Ours: K + 2 reads forward (the vectors are a
  separate (K, N) x (N, C) matmul); forward+backward K + 1 (XLA drops the
  unused vectors) + 3 (``X G^T``, ``dS X``, the pass that writes) and the write.
  """
  return {"fwd": dict(min=((k + 1) * x_bytes, 0), ours=((k + 2) * x_bytes, 0)),
          "fwd+bwd": dict(min=((k + 2) * x_bytes, x_bytes),
                          ours=((k + 4) * x_bytes, x_bytes))}


def _bound_ms(read_write, bw_read, bw_rw):
  """Time to move the bytes at this machine's streaming rates.

  Reads alone stream at ``bw_read``; reads and writes together reach
  ``bw_rw`` (bytes read + written), on this machine 1.6x to 2x ``bw_read``.
  """
  r, w = read_write
  return max(r / bw_read, (r + w) / bw_rw) * 1e3


class Bandwidth:
  """This machine's streaming rates on a 1 GiB array (32x the 32 MB L3)."""

  def __init__(self):
    self.big = jnp.ones((2 ** 17, 2048), jnp.float32)
    self._read = jax.jit(lambda a: jnp.sum(a, axis=1))
    self._update = jax.jit(lambda a: a * 1.0000001, donate_argnums=0)

  def measure(self, iters):
    """Returns (read B/s, read+write B/s) medians over ``iters`` calls."""
    nbytes = self.big.nbytes
    read = _median_ms(lambda: self._read(self.big).block_until_ready(), iters)

    def update():
      self.big = self._update(self.big)
      self.big.block_until_ready()

    rw = _median_ms(update, iters)
    return nbytes / read * 1e3, 2 * nbytes / rw * 1e3


def _jax_fns(cot, op=brnpa):
  fwd = jax.jit(lambda f: op(f, K)[:2])
  grad = jax.grad(lambda f: jnp.sum(op(f, K).vectors * cot))
  # keep_unused so that the donated buffer reaches XLA, which writes the
  # gradient into it: the steady state of a loop that reuses its memory.
  into = jax.jit(lambda buf, f: grad(f), donate_argnums=0, keep_unused=True)
  return fwd, jax.jit(grad), into


def _jvp_fn(op=brnpa):
  """Forward mode: the vectors and their derivative along a tangent."""
  return jax.jit(lambda f, df: jax.jvp(lambda x: op(x, K).vectors, (f,), (df,)))


def _load_operator(path):
  """``brnpa`` of another copy of brnpa.py (it imports only jax and numpy)."""
  spec = importlib.util.spec_from_file_location("brnpa_against", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.brnpa


def _torch_fns(feats_nhwc, cot):
  dev = _torch_device()
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(feats_nhwc, (0, 3, 1, 2))))
  x = x.to(dev)
  xg = x.clone().requires_grad_(True)
  cot_t = torch.from_numpy(cot).to(dev)

  def fwd():
    with torch.no_grad():
      return _torch_sync(torch_brnpa(x, K))

  def fwd_bwd():
    vectors, _ = torch_brnpa(xg, K)
    return _torch_sync(torch.autograd.grad((vectors * cot_t).sum(), xg)[0])

  return fwd, fwd_bwd


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _check(jax_fns, torch_fns, feats):
  """Both implementations give the same vectors and gradients."""
  vec_j = np.asarray(jax_fns[0](feats)[0])
  grad_j = np.asarray(jax_fns[1](feats))
  vec_t = torch_fns[0]()[0].cpu().numpy()
  grad_t = np.transpose(torch_fns[1]().cpu().numpy(), (0, 2, 3, 1))
  errs = _rel_err(vec_j, vec_t), _rel_err(grad_j, grad_t)
  if max(errs) > 1e-4:
    raise AssertionError(f"JAX and PyTorch disagree: relative error {errs}")
  return errs


def _cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo on Linux), or ''."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def _l3_bytes():
  try:
    with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
      size = f.read().strip()
    return int(size[:-1]) * {"K": 2 ** 10, "M": 2 ** 20}[size[-1]]
  except (OSError, ValueError, KeyError):
    return 0


def _setup(args, have_torch, against):
  """One dict per feature size: inputs, jitted/torch callables, the check."""
  cases = []
  for s in (int(v) for v in args.sizes.split(",")):
    rng = np.random.default_rng(s)
    feats = np.maximum(rng.standard_normal((args.batch, s, s, args.channels),
                                           np.float32), 0)  # post-ReLU
    cot = rng.standard_normal((args.batch, K, args.channels), np.float32)
    tangent = rng.standard_normal(feats.shape, np.float32)
    x = jnp.asarray(feats)
    jfns = _jax_fns(jnp.asarray(cot))
    tfns = _torch_fns(feats, cot) if have_torch else None
    errs = _check(jfns, tfns, x) if have_torch else None
    other = _jax_fns(jnp.asarray(cot), against) if against else None
    other_errs = _check_against(jfns, other, x) if against else None
    cases.append(dict(s=s, x=x, jax=jfns, torch=tfns, errs=errs,
                      jvp=_jvp_fn(), dx=jnp.asarray(tangent), other=other,
                      other_errs=other_errs, buf=jnp.zeros_like(x), rows={},
                      modes={}))
  return cases


def _check_against(ours, other, feats):
  """Both versions give the same vectors and gradients."""
  errs = (_rel_err(ours[0](feats)[0], other[0](feats)[0]),
          _rel_err(ours[1](feats), other[1](feats)))
  if max(errs) > 1e-4:
    raise AssertionError(f"--against gives other results: relative error {errs}")
  return errs


def _measure(cases, bandwidth, args, have_torch):
  """Interleaved rounds: bandwidth, then each case's JAX and torch timings.

  Appends (jax ms, torch ms, (read B/s, read+write B/s)) per round to
  ``case['rows'][pass]``; returns all bandwidth probes.
  """
  def into(case):
    case["buf"] = case["jax"][2](case["buf"], case["x"])
    return case["buf"].block_until_ready()

  bws = []
  for round_index in range(args.rounds):
    bws.append(bandwidth.measure(args.iters))
    for c in cases:
      fwd, grad, _ = c["jax"]
      x = c["x"]
      runs = {"fwd": (lambda: jax.block_until_ready(fwd(x)), 0),
              "fwd+bwd": (lambda: grad(x).block_until_ready(), 1),
              "fwd+bwd*": (lambda: into(c), None)}
      for name, (fn, torch_i) in runs.items():
        t_torch = float("nan")
        if have_torch and torch_i is not None:
          t_torch = _median_ms(c["torch"][torch_i], args.torch_iters)
        c["rows"].setdefault(name, []).append(
            (_median_ms(fn, args.iters), t_torch, bws[-1]))
      _measure_modes(c, args.iters, round_index)
  bws.append(bandwidth.measure(args.iters))
  return bws


def _measure_modes(c, iters, round_index):
  """This round's jvp time, and with --against, both versions' fwd and
  fwd+bwd timed back to back, in alternating order from round to round."""
  x, dx = c["x"], c["dx"]
  c["modes"].setdefault("jvp", []).append(
      (_median_ms(lambda: jax.block_until_ready(c["jvp"](x, dx)), iters),
       float("nan")))
  if c["other"] is None:
    return
  for i, name in enumerate(("fwd", "fwd+bwd")):
    fns = [c["jax"][i], c["other"][i]]
    times = [None, None]
    order = (0, 1) if round_index % 2 == 0 else (1, 0)
    for which in order:
      fn = fns[which]
      times[which] = _median_ms(lambda: jax.block_until_ready(fn(x)), iters)
    c["modes"].setdefault(name, []).append(tuple(times))


def _print_table(cases, bws, args):
  read_bw = statistics.median(b[0] for b in bws)
  rw_bw = statistics.median(b[1] for b in bws)
  print(f"memory bandwidth, median of {len(bws)} probes: read {read_bw / 1e9:.1f} GB/s "
        f"(jitted row sums of a 1 GiB array), read+write {rw_bw / 1e9:.1f} GB/s "
        "(in-place update of it, bytes read + written)")
  print("bound = max(read bytes / read BW, all bytes / read+write BW); "
        "torch/jax and 'x bound' are medians of per-round ratios\n")
  hdr = (f"{'features':>16} {'pass':>9} | {'jax ms':>8} {'torch ms':>9} "
         f"{'torch/jax':>9} | {'min MB':>7} {'GB/s':>6} {'x bound':>7} | "
         f"{'ours MB':>7} {'x ours':>6}")
  print(hdr)
  print("-" * len(hdr))
  l3 = _l3_bytes()
  for c in cases:
    x_bytes = c["x"].nbytes
    traffic = _traffic(x_bytes, K)
    for name, rows in c["rows"].items():
      t = traffic[name.rstrip("*")]
      jax_ms = statistics.median(r[0] for r in rows)
      torch_ms = statistics.median(r[1] for r in rows)
      ratio = statistics.median(r[1] / r[0] for r in rows)
      x_min, x_ours = (statistics.median(r[0] / _bound_ms(t[key], *r[2]) for r in rows)
                       for key in ("min", "ours"))
      shape = f"{args.batch}x{c['s']}x{c['s']}x{args.channels}"
      torch_col = (f"{torch_ms:9.1f} {ratio:8.1f}x" if np.isfinite(ratio)
                   else f"{'-':>9} {'-':>9}")
      print(f"{shape:>16} {name:>9} | {jax_ms:8.1f} {torch_col} | "
            f"{sum(t['min']) / 1e6:7.0f} {sum(t['min']) / jax_ms / 1e6:6.1f} "
            f"{x_min:6.2f}x | {sum(t['ours']) / 1e6:7.0f} {x_ours:5.2f}x")
    fresh = [a[0] - b[0] for a, b in zip(c["rows"]["fwd+bwd"], c["rows"]["fwd+bwd*"])]
    print(f"{'':>16} fresh gradient buffer: {statistics.median(fresh):+.1f} ms "
          "(fwd+bwd minus fwd+bwd*: the kernel faulting in and zeroing new pages)")
    # The best any implementation could do with a fresh gradient buffer: the
    # minimum traffic at this run's bandwidth plus the cost of new pages.
    ceiling = [r[1] / (_bound_ms(traffic["fwd+bwd"]["min"], *r[2]) + max(f, 0.0))
               for r, f in zip(c["rows"]["fwd+bwd"], fresh)]
    if all(np.isfinite(ceiling)):
      print(f"{'':>16} ceiling of torch/jax for fwd+bwd (minimum traffic at this "
            f"bandwidth + the fresh buffer): {statistics.median(ceiling):.1f}x")
    if c["errs"]:
      print(f"{'':>16} check: JAX vs PyTorch relative error, "
            f"vectors {c['errs'][0]:.1e}, gradient {c['errs'][1]:.1e}")
    if l3 and x_bytes <= l3:
      # A virtual machine reports its host's whole L3, shared with the other
      # guests: how much of it holds our features is unknown.
      print(f"{'':>16} ({x_bytes / 2 ** 20:.0f} MiB of features are below the "
            f"{l3 / 2 ** 20:.0f} MiB L3 this machine reports: part of them may "
            "stay cached, so the DRAM bound may not apply)")
  print("\nfwd+bwd: jax.grad, a fresh gradient buffer per call (as "
        "torch.autograd.grad).\nfwd+bwd*: the gradient written into a donated "
        "buffer of the same shape."
        "\nGB/s: minimum bytes / time. min MB, ours MB: bytes read + written at the"
        "\nminimum and by our implementation (see _traffic); x bound, x ours: time"
        "\nover those bytes at this run's bandwidth.")


def _print_modes(cases, args):
  """Autodiff modes, and this version against --against, per round ratios."""
  print("\nautodiff modes" + (f"; against {args.against}" if args.against else ""))
  hdr = (f"{'features':>16} {'pass':>9} | {'ours ms':>8} {'x fwd':>6} | "
         f"{'against ms':>10} {'ours/against':>12}")
  print(hdr)
  print("-" * len(hdr))
  for c in cases:
    shape = f"{args.batch}x{c['s']}x{c['s']}x{args.channels}"
    fwd_rows = c["modes"].get("fwd") or c["rows"]["fwd"]
    fwd_ms = statistics.median(r[0] for r in fwd_rows)
    for name in ("fwd", "jvp", "fwd+bwd"):
      rows = c["modes"].get(name) or c["rows"][name]
      ours = statistics.median(r[0] for r in rows)
      other_col = f"{'-':>10} {'-':>12}"
      if name != "jvp" and c["other"] is not None:
        other_col = (f"{statistics.median(r[1] for r in rows):10.1f} "
                     f"{statistics.median(r[0] / r[1] for r in rows):11.3f}x")
      print(f"{shape:>16} {name:>9} | {ours:8.1f} {ours / fwd_ms:5.2f}x | {other_col}")
    if c["other_errs"]:
      print(f"{'':>16} check: ours vs against, relative error vectors "
            f"{c['other_errs'][0]:.1e}, gradient {c['other_errs'][1]:.1e}")
  print("jvp: jax.jvp of the vectors along a random tangent, jitted (forward "
        "mode); x fwd: over this table's fwd.\nours/against: median over "
        "rounds of the per-round ratio, the two timed back to back in "
        "alternating order.")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="14,56", help="spatial sizes S, comma-separated")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--channels", type=int, default=2048)
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  p.add_argument("--iters", type=int, default=5, help="timed calls per measurement")
  p.add_argument("--torch_iters", type=int, default=3)
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--against", default="", help="another brnpa.py to time "
                 "side by side with this one (e.g. main's, via git show)")
  args = p.parse_args()

  threads = len(os.sched_getaffinity(0))
  have_torch = torch is not None and not args.no_torch
  cpu = _cpu_model()
  print(f"device: {jax.devices()[0].device_kind}{f' ({cpu})' if cpu else ''}, "
        f"{threads} cores; "
        f"jax {jax.__version__} (XLA's CPU thread pool uses all {threads})")
  if have_torch:
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__} on {_torch_device()}: "
          f"torch.set_num_threads({threads}), eager, "
          "reference-style operator (benchmarks/torch_models.py:torch_brnpa)")
  elif torch is None:
    print("PyTorch is not importable: PyTorch column skipped "
          "(pip install -r requirements-bench.txt)")
  else:
    print("--no_torch: PyTorch column skipped")

  against = _load_operator(args.against) if args.against else None
  cases = _setup(args, have_torch, against)
  bws = _measure(cases, Bandwidth(), args, have_torch)
  _print_table(cases, bws, args)
  _print_modes(cases, args)


if __name__ == "__main__":
  main()
