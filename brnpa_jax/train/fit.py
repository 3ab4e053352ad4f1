"""The largest per-device batch whose train step fits a TPU's HBM.

Each try compiles the config's train step for the topology (minutes at
448 px), so the search spends few: a step's memory is close to affine in
the batch (fixed: parameters, optimiser state, code; per image:
activations), so two small batches give a line, the line predicts the
largest batch, and compiles around the prediction confirm it (bisecting
when the line misses). A batch counts as fitting when it compiles with no
rematerialisation: when activations exceed the HBM, XLA recomputes some of
them in the backward pass instead of failing, which shows as more flops per
image than at the smallest batch; such a batch trains, slower.

Memory per device depends on the per-device batch, not on the slice size,
for data parallelism (fsdp = 1): a slice of any size of the same
generation gives the same answer, so searching on its smallest topology is
enough. Nothing is cached on disk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import ml_collections

from brnpa_jax.train import aot
from brnpa_jax.train.chips import GiB

# More flops per image than at the smallest batch by this factor means XLA
# rematerialised activations.
REMAT_TOLERANCE = 1.02


@dataclasses.dataclass
class Try:
  """One compiled (or failed) batch."""
  batch_per_device: int
  report: aot.StepReport | None  # None: out of memory
  rematerialised: bool = False

  @property
  def fits(self) -> bool:
    return self.report is not None and not self.rematerialised


@dataclasses.dataclass
class FitResult:
  """The search's outcome for one config, dtype and topology.

  Attributes:
    best: the largest fitting try (None: not even one image fits).
    tries: every compile, in order.
    fixed_bytes, bytes_per_image: the line through the two smallest fits.
  """
  topology: str
  dtype: str
  best: Try | None
  tries: list[Try]
  fixed_bytes: float
  bytes_per_image: float

  @property
  def limit(self) -> Try | None:
    """The smallest try above ``best`` (does not fit, or rematerialises)."""
    above = [t for t in self.tries if not t.fits and
             (self.best is None or t.batch_per_device > self.best.batch_per_device)]
    return min(above, key=lambda t: t.batch_per_device) if above else None


def with_batch(config, per_device: int, devices: int, dtype: str | None = None):
  """``config`` training ``per_device`` images per device in one step."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.batch_size = c.eval_batch_size = per_device * devices
  c.grad_accum_steps = 1
  if dtype:
    c.dtype = dtype
  return c


def granularity(batch: float, step: int) -> int:
  """The batch resolution worth a compile near ``batch``: ``step``, or about
  a tenth of the batch (a power of two) for large batches."""
  if not batch > 0 or not math.isfinite(batch):
    return step
  return max(step, 2 ** int(math.log2(max(batch, 1) / 10)))


def line(tries) -> tuple[float, float]:
  """``(fixed bytes, bytes per image)`` through the two largest fits; with
  one fit, its non-activation bytes (arguments, outputs not aliased, code
  and a gradient the size of the state) are taken as fixed."""
  fits = sorted((t for t in tries if t.fits), key=lambda t: t.batch_per_device)
  if not fits:
    return math.nan, math.nan
  if len(fits) == 1:
    r = fits[0].report
    fixed = (r.argument_bytes + r.output_bytes - r.alias_bytes + r.code_bytes
             + r.state_bytes)
    return fixed, (r.total_bytes - fixed) / fits[0].batch_per_device
  a, b = fits[-2].report, fits[-1].report
  slope = ((b.total_bytes - a.total_bytes)
           / (fits[-1].batch_per_device - fits[-2].batch_per_device))
  return a.total_bytes - slope * fits[-2].batch_per_device, slope


def estimate(report) -> tuple[float, float, int]:
  """``(fixed bytes, bytes per image, batch)`` predicted from one compiled
  train step: its non-activation bytes as fixed (``line``), the rest per
  image; the batch where that line meets the HBM. The temporaries not
  proportional to the batch count as per image, so the line overstates the
  bytes per image; but XLA starts rematerialising before the HBM is full,
  so the estimate is a starting point (``--fit_start``), not an answer."""
  fixed, slope = line([Try(int(report.batch_per_device), report)])
  if not slope > 0:
    return fixed, slope, 0
  return fixed, slope, int((report.hbm_bytes - fixed) // slope)


def search(config, devices, chip, topology: str, *, num_classes: int,
           dtype: str, step: int = 4, start: int = 0, max_compiles: int = 4,
           log: Callable[[str], None] = print) -> FitResult:
  """Searches the largest per-device batch that fits, to within
  ``granularity``.

  Args:
    config: the run's config (its batch sizes and accumulation are replaced).
    devices, chip, topology: from ``aot.topology``.
    num_classes: the classifier's size.
    dtype: ``float32`` or ``bfloat16``.
    step: the finest batch granularity.
    start: the first batch tried (0: ``step``); a good guess saves compiles.
    max_compiles: stop after this many compiles.
    log: progress lines.
  """
  n = config.mesh.num_devices or len(devices)
  tries: dict[int, Try] = {}
  baseline: list[float] = []

  def attempt(b: int) -> Try:
    try:
      (report,) = aot.compile_steps(with_batch(config, b, n, dtype), devices,
                                    chip, topology, num_classes=num_classes,
                                    kinds=("train",))
    except aot.DoesNotFit:
      t = Try(b, None)
      log(f"  {topology} {dtype} batch {b}/device: does not fit")
    else:
      if not baseline:
        baseline.append(report.flops_per_image)
      remat = (report.rematerialised
               or report.flops_per_image > REMAT_TOLERANCE * baseline[0])
      t = Try(b, report, remat)
      log(f"  {topology} {dtype} batch {b}/device: "
          f"{report.total_bytes / GiB:.2f} GiB of "
          f"{chip.hbm_bytes / GiB:.1f}, "
          f"{report.flops_per_image / 1e9:.1f} GFLOP/image"
          + (" (rematerialised)" if remat else "")
          + f", compiled in {report.compile_seconds:.0f} s")
    tries[b] = t
    return t

  first = start or step
  while not attempt(first).fits and first > 1 and len(tries) < max_compiles:
    first = max(1, (first // 2) // step * step) if first > step else 1
  lo = max((b for b, t in tries.items() if t.fits), default=None)
  hi = min((b for b, t in tries.items() if not t.fits), default=None)
  while lo is not None and len(tries) < max_compiles:
    fixed, slope = line(tries.values())
    guess = (chip.hbm_bytes - fixed) / slope if slope > 0 else 2 * lo
    gran = granularity(guess, step)
    if hi is not None and hi - lo <= gran:
      break
    guess = int(guess // gran) * gran
    if hi is not None and guess >= hi:
      guess = hi - gran  # the line says the limit is just below the failure
    guess = max(guess, lo + gran)
    if (hi is not None and guess >= hi) or guess in tries:
      break
    if attempt(guess).fits:
      lo = guess
    else:
      hi = guess
  fixed, slope = line(tries.values())
  return FitResult(topology, dtype, tries.get(lo),
                   sorted(tries.values(), key=lambda t: t.batch_per_device),
                   fixed, slope)
