"""The PyTorch peer: the model run the way a speed-minded PyTorch user runs it.

Needs ``torch`` (``pip install -r requirements-bench.txt``); the model is
``benchmarks.torch_models``. A ``Recipe`` says how it runs:

- ``torch.compile`` with ``mode='default'`` (``compiled``) or
  ``'max-autotune-no-cudagraphs'`` (``max-autotune``), or eager (``eager``);
  the compile time is the first step's time minus a steady step's;
- ``dtype='bfloat16'``: ``torch.autocast`` to bfloat16 around the forward and
  the loss (parameters, gradients and optimiser state stay float32, as ours);
  ``float32`` on a GPU runs matmuls and convolutions as TF32, as XLA's default
  precision does (``torch.set_float32_matmul_precision('high')``);
- channels-last memory format for the model and its input (``+nchw`` in a
  recipe's name turns it off);
- SGD with momentum, ``fused=True``; ``cudnn.benchmark`` on.

``train_figures``, ``infer_figures`` and ``deletion_figures`` time the train
step, inference and the deletion metric's batched forwards (the release
protocol: one perturbed image per feature cell, ``chunk`` of them per
forward, the tracked probability read back once at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import torch_models

MODES = {"eager": None, "compiled": "default",
         "max-autotune": "max-autotune-no-cudagraphs"}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the PyTorch model runs (see the module docstring)."""
  name: str
  compile_mode: str | None
  channels_last: bool = True
  fused_sgd: bool = True


def recipe(name: str) -> Recipe:
  """``eager``, ``compiled`` or ``max-autotune``, optionally ``+nchw``."""
  base, _, suffix = name.partition("+")
  if base not in MODES or suffix not in ("", "nchw"):
    raise ValueError(f"unknown PyTorch recipe {name!r}; use one of "
                     f"{sorted(MODES)}, optionally followed by +nchw.")
  return Recipe(name, MODES[base], channels_last=suffix != "nchw")


def setup(threads: int | None = None) -> None:
  """Process-wide settings a speed-minded user makes (see module docstring)."""
  if threads:
    torch.set_num_threads(threads)
  torch.backends.cudnn.benchmark = True
  if torch.cuda.is_available():
    torch.set_float32_matmul_precision("high")
  # Every measurement compiles a new model; dynamo's default of 8 graphs
  # per code object would otherwise fall back to eager without a word.
  torch._dynamo.config.cache_size_limit = 256  # pylint: disable=protected-access
  torch._dynamo.config.accumulated_cache_size_limit = 4096  # pylint: disable=protected-access


def describe() -> str:
  dev = torch_models.device()
  name = torch.cuda.get_device_name() if dev == "cuda" else f"{torch.get_num_threads()} threads"
  return f"torch {torch.__version__} on {dev} ({name})"


def _timed(fn, iters: int) -> float:
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    torch_models.sync()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _autocast(dtype: str):
  if dtype == "bfloat16":
    return torch.autocast(torch_models.device(), dtype=torch.bfloat16)
  if dtype != "float32":
    raise ValueError(f"dtype must be float32 or bfloat16; got {dtype!r}.")
  return contextlib.nullcontext()


def _model(rec: Recipe, head, strides, num_classes, stage_sizes, width, train):
  """(module, the callable to run: compiled or not, the memory format)."""
  torch._dynamo.reset()  # pylint: disable=protected-access
  fmt = torch.channels_last if rec.channels_last else torch.contiguous_format
  model = torch_models.build_classifier(
      head, strides, num_classes, stage_sizes=stage_sizes, width=width)
  model = model.to(torch_models.device(), memory_format=fmt).train(train)
  run = (torch.compile(model, mode=rec.compile_mode, dynamic=False)
         if rec.compile_mode else model)
  return model, run, fmt


def _images(batch, size, fmt):
  return torch.randn(batch, 3, size, size, device=torch_models.device()).to(
      memory_format=fmt)


def _reset_peak():
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peak_mib():
  if torch.cuda.is_available():
    return torch.cuda.max_memory_allocated() / 2**20
  return float("nan")


def _figures(batch, first_s, step_s, rec) -> dict:
  return {"img_s": batch / step_s, "step_s": step_s, "first_s": first_s,
          "compile_s": max(first_s - step_s, 0.0) if rec.compile_mode else 0.0,
          "mib": _peak_mib()}


def train_figures(rec: Recipe, *, head: str, size: int, strides, batch: int,
                  dtype: str, iters: int, warmup: int = 1, num_classes: int = 200,
                  stage_sizes=(3, 4, 6, 3), width: int = 64) -> dict:
  """Images/s, first-step and compile seconds, peak MiB of the train step."""
  model, run, fmt = _model(rec, head, strides, num_classes, stage_sizes, width,
                           train=True)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                        fused=rec.fused_sgd)
  x = _images(batch, size, fmt)
  y = torch.zeros(batch, dtype=torch.long, device=x.device)

  def step():
    opt.zero_grad(set_to_none=True)
    with _autocast(dtype):
      loss = F.cross_entropy(run(x), y)
    loss.backward()
    opt.step()

  _reset_peak()
  first_s = _timed(step, 1)
  for _ in range(warmup):
    step()
  torch_models.sync()
  return _figures(batch, first_s, _timed(step, iters), rec)


def infer_figures(rec: Recipe, *, head: str, size: int, strides, batch: int,
                  dtype: str, iters: int, warmup: int = 1, num_classes: int = 200,
                  stage_sizes=(3, 4, 6, 3), width: int = 64) -> dict:
  """Images/s of inference (softmax probabilities) on one batch."""
  _, run, fmt = _model(rec, head, strides, num_classes, stage_sizes, width,
                       train=False)
  x = _images(batch, size, fmt)

  def step():
    with torch.inference_mode(), _autocast(dtype):
      return torch.softmax(run(x).float(), -1)

  _reset_peak()
  first_s = _timed(step, 1)
  for _ in range(warmup):
    step()
  torch_models.sync()
  return _figures(batch, first_s, _timed(step, iters), rec)


def deletion_figures(rec: Recipe, *, head: str, size: int, strides, images: int,
                     chunk: int, dtype: str, num_classes: int = 200,
                     stage_sizes=(3, 4, 6, 3), width: int = 64,
                     output_stride: int = 8) -> dict:
  """Seconds per image of the release protocol's deletion curve, batched.

  One perturbed image per feature cell (``(size / output_stride)**2`` steps):
  step k zeroes the pixel blocks of the k most salient cells (a random
  order: the timing does not depend on it), ``chunk`` images per forward.
  """
  _, run, fmt = _model(rec, head, strides, num_classes, stage_sizes, width,
                       train=False)
  dev = torch_models.device()
  x = _images(images, size, fmt)
  cells = size // output_stride
  order = torch.stack([torch.randperm(cells * cells, device=dev)
                       for _ in range(images)])
  ranks = order.argsort(1).reshape(images, cells, cells)
  ranks = ranks.repeat_interleave(output_stride, 1).repeat_interleave(output_stride, 2)
  steps = cells * cells
  pair_image = torch.arange(images, device=dev).repeat_interleave(steps)
  pair_k = torch.arange(1, steps + 1, device=dev).repeat(images)
  total = len(pair_image)

  def curves(limit=None):
    with torch.inference_mode(), _autocast(dtype):
      classes = run(x).argmax(-1)
      out = []
      for i in range(0, total if limit is None else limit, chunk):
        pi = pair_image[i:i + chunk]
        pk = pair_k[i:i + chunk]
        if len(pi) < chunk:  # a fixed chunk shape, as ours: no recompilation
          pad = chunk - len(pi)
          pi = torch.cat([pi, pi[:1].expand(pad)])
          pk = torch.cat([pk, pk[:1].expand(pad)])
        keep = (ranks[pi] >= pk[:, None, None])[:, None]
        batch = torch.where(keep, x[pi], torch.zeros((), device=dev))
        probs = torch.softmax(run(batch.contiguous(memory_format=fmt)).float(), -1)
        out.append(probs.gather(1, classes[pi][:, None])[:, 0])
      return torch.cat(out)[:total].cpu()

  t0 = time.perf_counter()
  curves(limit=chunk)  # compiles both shapes
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  curve = curves()
  seconds = time.perf_counter() - t0
  if curve.shape != (total,):
    raise AssertionError(f"expected {total} probabilities; got {tuple(curve.shape)}")
  return {"s_per_image": seconds / images, "forwards_per_image": steps,
          "first_s": first_s, "compile_s": first_s if rec.compile_mode else 0.0}
