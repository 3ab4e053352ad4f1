"""The PyTorch side of ``benchmarks.gpu_suite``: one function per kind of job.

Each takes the job (a dict from the suite's plan, with its ``recipe``: see
``benchmarks.torch_peer``) and the run's context, and returns a JSON-able
dict.
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from benchmarks import torch_models, torch_peer
from brnpa_jax.models import STRIDES


def probe(compile_check: bool) -> dict:
  """Versions, the device and whether ``torch.compile`` works here (it needs
  a C compiler and, on a GPU, triton)."""
  out = {"torch": torch.__version__, "device": torch_models.device(),
         "device_name": (torch.cuda.get_device_name()
                         if torch.cuda.is_available() else "cpu"),
         "cc": shutil.which("cc") or shutil.which("gcc") or None}
  try:
    import triton  # pylint: disable=import-outside-toplevel  # optional: GPU compile only
    out["triton"] = triton.__version__
  except ImportError:
    out["triton"] = None
  if compile_check:
    t0 = time.perf_counter()
    try:
      f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
      f(torch.ones(8, device=torch_models.device()))
      torch_models.sync()
      out["compile_ok"] = True
    except Exception as e:  # pylint: disable=broad-except
      out["compile_ok"] = False
      out["compile_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    out["compile_probe_s"] = time.perf_counter() - t0
  return out


def _spec(job, ctx) -> dict:
  return dict(head=job["head"], size=job["size"], strides=STRIDES[job["res"]],
              dtype=job["dtype"], stage_sizes=ctx["stage_sizes"],
              width=ctx["width"])


def _setup(ctx):
  del ctx
  cpus = len(os.sched_getaffinity(0))  # the cores this process may use
  torch_peer.setup(None if torch.cuda.is_available() else cpus)


def train(job, ctx) -> dict:
  _setup(ctx)
  out = torch_peer.train_figures(torch_peer.recipe(job["recipe"]),
                                 batch=job["batch"], iters=ctx["iters"],
                                 warmup=ctx["warmup"], **_spec(job, ctx))
  if job.get("infer"):
    out["infer"] = torch_peer.infer_figures(
        torch_peer.recipe(job["recipe"]), batch=job["batch"], iters=ctx["iters"],
        warmup=ctx["warmup"], **_spec(job, ctx))
  return out


def infer(job, ctx) -> dict:
  _setup(ctx)
  return torch_peer.infer_figures(torch_peer.recipe(job["recipe"]),
                                  batch=job["batch"], iters=ctx["iters"],
                                  warmup=ctx["warmup"], **_spec(job, ctx))


def deletion(job, ctx) -> dict:
  _setup(ctx)
  return torch_peer.deletion_figures(
      torch_peer.recipe(job["recipe"]), images=job["images"], chunk=job["chunk"],
      **_spec(job, ctx))


JOBS = {"train": train, "infer": infer, "deletion": deletion}
