"""Published figures of TPU chips, and the topology names of pod slices.

Ahead-of-time compilation (``brnpa_jax.train.aot``) divides a compiled
step's flops and bytes by these figures for a roofline bound on its time,
and compares its memory with the HBM. All figures are per JAX device of the
topology: one chip for v5e and v5p, one TensorCore for v4 (the v4 topology
this compiler builds has a device per TensorCore, so half a chip's HBM,
compute and bandwidth; a real v4 host runs both cores of a chip as one
"megacore" device with all of it).

Peak compute is the bf16 matrix-unit peak. float32 matrix products and
convolutions run on the same units: with JAX's default precision
(``jax_default_matmul_precision`` unset or ``bfloat16``) as one bf16 pass, so
at the bf16 peak; ``tensorfloat32`` / ``bfloat16_3x`` take 3 passes and
``float32`` / ``highest`` 6, dividing the peak by as much.
"""

from __future__ import annotations

import dataclasses
import re

GiB = 1024 ** 3
GB = 1000 ** 3
TFLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class Chip:
  """One device of a TPU generation, as the compiler sees it.

  Attributes:
    generation: the topology prefix (``v5e``).
    hbm_bytes: HBM per device.
    peak_flops: bf16 matrix-unit peak per device, FLOP/s.
    hbm_bandwidth: bytes/s per device.
    cores_per_device: TensorCores one topology device stands for.
    chips_per_host: chips a host (one JAX process) drives.
    source: where the figures are published.
    compilable: whether this project's libtpu compiles for it.
    note: shown with the figures.
  """
  generation: str
  hbm_bytes: float
  peak_flops: float
  hbm_bandwidth: float
  cores_per_device: int
  chips_per_host: int
  source: str
  compilable: bool = True
  note: str = ""


CHIPS = {c.generation: c for c in (
    # Cloud TPU docs, "TPU v4" (system architecture): per chip 275 TFLOP/s
    # bf16, 32 GiB HBM2 at 1200 GB/s, two TensorCores; halved per core.
    Chip("v4", 16 * GiB, 275 / 2 * TFLOPS, 1200 / 2 * GB, 1, 4,
         "https://cloud.google.com/tpu/docs/v4",
         note="per TensorCore (half a chip): the topology has a device per "
              "core; a real v4 host runs each chip as one megacore device"),
    # Cloud TPU docs, "TPU v5e": per chip 197 TFLOP/s bf16, 16 GB HBM2 at
    # 819 GB/s, one TensorCore.
    Chip("v5e", 16 * GiB, 197 * TFLOPS, 819 * GB, 1, 4,
         "https://cloud.google.com/tpu/docs/v5e"),
    # Cloud TPU docs, "TPU v5p": per chip 459 TFLOP/s bf16, 95 GB HBM2e at
    # 2765 GB/s (two TensorCores run as one megacore device).
    Chip("v5p", 95 * GB, 459 * TFLOPS, 2765 * GB, 2, 4,
         "https://cloud.google.com/tpu/docs/v5p"),
    # Cloud TPU docs, "TPU v6e": per chip 918 TFLOP/s bf16, 32 GB HBM at
    # 1638 GB/s. This project's libtpu crashes compiling for it.
    Chip("v6e", 32 * GB, 918 * TFLOPS, 1638 * GB, 1, 4,
         "https://cloud.google.com/tpu/docs/v6e", compilable=False,
         note="the pinned libtpu's compiler crashes (stack overflow) on v6e "
              "topologies"),
)}

# Topologies this project's libtpu (0.0.42) was seen to build; others of the
# same form may work too.
KNOWN_TOPOLOGIES = {
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"),
    "v5e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("2x2x1", "2x2x2", "2x4x4", "4x4x4"),
}

# Precision setting -> bf16 passes per float32 matrix product.
_F32_PASSES = {None: 1, "default": 1, "bfloat16": 1, "fastest": 1,
               "tensorfloat32": 3, "bfloat16_3x": 3, "high": 3,
               "float32": 6, "highest": 6}


def peak_flops(chip: Chip, dtype: str, precision: str | None) -> float:
  """The matrix-unit peak a step in ``dtype`` can reach under ``precision``
  (``jax.config.jax_default_matmul_precision``)."""
  if dtype == "bfloat16":
    return chip.peak_flops
  return chip.peak_flops / _F32_PASSES.get(precision, 1)


def accepted_names() -> str:
  """The topology names to suggest, on one line."""
  spans = [f"{g}:{shapes[0]}..{shapes[-1]}" for g, shapes in KNOWN_TOPOLOGIES.items()]
  return (", ".join(spans) + ", or a slice name such as v5e-16, v4-8, v5p-8 "
          "(chips for v5e, TensorCores for v4/v5p)")


def _slice_to_topology(generation: str, count: int) -> str | None:
  """``v5e-16`` -> ``v5e:4x4``; ``v4-8`` / ``v5p-8`` (TensorCores) -> ``2x2x1``."""
  chips = count // 2 if generation in ("v4", "v5p") else count
  for shape in KNOWN_TOPOLOGIES.get(generation, ()):
    dims = [int(d) for d in shape.split("x")]
    n = 1
    for d in dims:
      n *= d
    if n == chips:
      return f"{generation}:{shape}"
  return None


def parse_topology(name: str) -> tuple[Chip, str]:
  """``(chip, topology name for the compiler)`` of ``v5e:4x4`` or ``v5e-16``.

  Raises:
    ValueError: an unknown generation, a malformed or unknown slice name, or
      a generation this libtpu cannot compile for; the message lists the
      accepted names.
  """
  name = name.strip().lower()
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  if m:
    topology = _slice_to_topology(m.group(1), int(m.group(2)))
    if topology is None:
      raise ValueError(f"unknown TPU slice {name!r}; use {accepted_names()}.")
    name = topology
  m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name)
  if not m or m.group(1) not in CHIPS:
    raise ValueError(f"unknown TPU topology {name!r}; use {accepted_names()}.")
  chip = CHIPS[m.group(1)]
  if not chip.compilable:
    raise ValueError(f"{name}: {chip.note}; use {accepted_names()}.")
  return chip, name
