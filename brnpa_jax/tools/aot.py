r"""Compiles a config's train, eval and inference steps for a TPU pod slice,
on a machine without a TPU, and reports per-device memory and cost.

  python -m brnpa_jax.tools.aot --config configs/default.py:runlocal \
      --topology v5e:2x2
  python -m brnpa_jax.tools.aot \
      --config 'configs/cub_brnpa_highres_distill.py:batch=64' \
      --topology v5e:4x4 --config.mesh.fsdp=2 --json /tmp/aot.json
  python -m brnpa_jax.tools.aot --config configs/cub_brnpa_highres_distill.py \
      --topology v5e:2x2,v5p:2x2x1 --fit

The steps are those ``train.py`` builds for the config (``--config`` and
``--config.<field>=<value>`` as there), compiled by libtpu's XLA compiler
for the topology's devices (needs the ``tpu`` extra:
``pip install -r requirements-tpu.txt -c constraints.txt``). Per step kind
it prints the memory of one device (arguments, outputs, temporaries, the
donated state aliased to outputs) against its HBM, flops and bytes accessed
per step, and a roofline LOWER BOUND on the step time, max(flops / peak,
bytes / HBM bandwidth) with the chip figures of ``brnpa_jax/train/chips.py``,
hence UPPER BOUNDS on images/s: derived from the compiled program, not
measured. A batch or ``mesh.fsdp`` that does not divide the topology is
refused as ``train.py`` refuses it.

``--fit`` searches, per dtype, the largest per-device batch whose train step
fits the HBM without rematerialisation (a few compiles, minutes each at
448 px), and says whether the config's batch needs gradient accumulation and
whether ``fsdp`` would pay. Topologies: ``v5e:2x2`` ... ``v5e:16x16``,
``v4:2x2x1`` ..., ``v5p:2x2x1`` ..., or slice names ``v5e-16``, ``v4-8``,
``v5p-8``; only one process can load libtpu at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

# Without a TPU, JAX must not try to start the TPU runtime for computations:
# libtpu is used for compiling only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

from brnpa_jax import cli  # noqa: E402  pylint: disable=wrong-import-position
from brnpa_jax.config_file import define_config_flag  # noqa: E402  pylint: disable=wrong-import-position
from brnpa_jax.errors import UserError  # noqa: E402  pylint: disable=wrong-import-position
from brnpa_jax.models.registry import DTYPES  # noqa: E402  pylint: disable=wrong-import-position

GiB = 1024 ** 3


def _define(fv: flags.FlagValues, argv) -> None:
  define_config_flag(fv, argv, "Config file, optionally with an arg: "
                     "'configs/default.py:runlocal'; fields with "
                     "--config.<field>=<value>.")
  flags.DEFINE_list("topology", None, "TPU topology, e.g. v5e:4x4, v4:2x2x1, "
                      "v5p:2x2x1 or a slice name (v5e-16); comma-separated "
                      "for several.", flag_values=fv)
  flags.DEFINE_list("steps", ["train", "eval", "predict"], "Step kinds to "
                    "compile.", flag_values=fv)
  flags.DEFINE_integer("num_classes", 0, "Classifier size; 0: the dataset's "
                       "(known for the catalogued datasets).", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_bool("fit", False, "Search the largest per-device batch that "
                    "fits (train step), per --fit_dtypes.", flag_values=fv)
  flags.DEFINE_list("fit_dtypes", list(DTYPES), "Dtypes for --fit.",
                    flag_values=fv)
  flags.register_validator(
      "fit_dtypes", lambda names: set(names) <= set(DTYPES),
      f"valid dtypes are {', '.join(DTYPES)}.", flag_values=fv)
  flags.DEFINE_integer("fit_step", 4, "Batch granularity of --fit.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("fit_start", 0, "First batch per device --fit tries "
                       "(0: --fit_step); a good guess saves compiles.",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("fit_max_compiles", 4, "Compiles per --fit search.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string("json", None, "Also write the results to this JSON file.",
                      flag_values=fv)
  flags.mark_flags_as_required(["config", "topology"], flag_values=fv)


def _gib(n: float) -> str:
  return f"{n / GiB:.2f}"


HEADER = (f"{'step':<8}{'batch/dev':>10}{'args':>7}{'out':>7}{'alias':>7}"
          f"{'temp':>7}{'total GiB':>10}{'HBM':>6}{'TFLOP':>8}{'GB r/w':>8}"
          f"{'bound ms':>10}{'':<4}{'img/s/dev':>10}{'img/s slice':>12}"
          f"{'compile':>9}")


def format_report(r) -> str:
  """One table row (``aot.StepReport``)."""
  bound = "flop" if r.compute_seconds >= r.memory_seconds else "mem"
  return (f"{r.kind:<8}{r.batch_per_device:>10g}{_gib(r.argument_bytes):>7}"
          f"{_gib(r.output_bytes):>7}{_gib(r.alias_bytes):>7}"
          f"{_gib(r.temp_bytes):>7}{_gib(r.total_bytes):>10}"
          f"{r.hbm_share:>6.0%}{r.flops / 1e12:>8.3f}"
          f"{r.bytes_accessed / 1e9:>8.1f}{r.roofline_seconds * 1e3:>10.1f}"
          f" {bound:<3}{r.images_per_second_device:>10.0f}"
          f"{r.images_per_second_slice:>12.0f}{r.compile_seconds:>8.0f}s")


def fit_advice(config, result, devices: int) -> list[str]:
  """What the found limit means for the config's own batch and for fsdp."""
  best = result.best
  if best is None:
    return ["  not even 1 image per device fits: use a smaller image size or "
            "a smaller model."]
  lines = []
  r = best.report
  per_device = config.batch_size / devices
  if per_device <= best.batch_per_device:
    lines.append(f"  batch_size={config.batch_size} on {devices} devices "
                 f"({per_device:g}/device) fits: no gradient accumulation "
                 "needed.")
  else:
    accum = math.ceil(per_device / best.batch_per_device)
    lines.append(f"  batch_size={config.batch_size} on {devices} devices "
                 f"({per_device:g}/device) does not fit in one step: "
                 f"grad_accum_steps={accum} or more (micro-batches of at "
                 f"most {best.batch_per_device}/device).")
  state = r.state_bytes
  if math.isfinite(result.bytes_per_image) and result.bytes_per_image > 0:
    freed = state * (1 - 1 / devices)
    images = freed / result.bytes_per_image
    lines.append(
        f"  fsdp: parameters + optimiser state take {_gib(state)} GiB per "
        f"device ({state / r.hbm_bytes:.1%} of HBM) next to "
        f"{_gib(result.bytes_per_image)} GiB per image; fsdp={devices} would "
        f"free at most {_gib(freed)} GiB, about {images:.1f} image(s) per "
        "device" + (", and adds all-gathers: not worth it." if images < 1
                    else "."))
  return lines


def _main(fv: flags.FlagValues) -> int:
  # pylint: disable=g-import-not-at-top  # jax and the models load after flags
  from brnpa_jax.train import aot
  from brnpa_jax.train import fit as fit_lib

  config = fv.config
  unknown = set(fv.steps) - set(aot.STEP_KINDS)
  if unknown:
    raise UserError(f"--steps: unknown {sorted(unknown)}; valid: "
                        f"{list(aot.STEP_KINDS)}.")
  num_classes = aot.num_classes_of(config, fv.num_classes)
  out, status = [], 0
  for name in fv.topology:
    chip, topo, devices = aot.topology(name)
    hosts = len({d.process_index for d in devices})
    print(f"{topo}: {len(devices)} devices on {hosts} host(s); per device "
          f"{chip.hbm_bytes / GiB:.1f} GiB HBM, {chip.peak_flops / 1e12:.0f} "
          f"TFLOP/s bf16 peak, {chip.hbm_bandwidth / 1e9:.0f} GB/s"
          + (f" ({chip.note})" if chip.note else "") + ".", flush=True)
    if fv.fit:
      for dtype in fv.fit_dtypes:
        result = fit_lib.search(config, devices, chip, topo,
                                num_classes=num_classes, dtype=dtype,
                                step=fv.fit_step, start=fv.fit_start,
                                max_compiles=fv.fit_max_compiles)
        best, limit = result.best, result.limit
        edge = (f"; larger batches not tried (--fit_max_compiles="
                f"{fv.fit_max_compiles})" if limit is None else
                f"; {limit.batch_per_device} " + ("rematerialises" if
                                                  limit.rematerialised
                                                  else "does not fit"))
        print(f"{topo} {dtype}: largest batch per device that fits: "
              f"{best.batch_per_device if best else 0}"
              + (f" ({_gib(best.report.total_bytes)} GiB)" if best else "")
              + edge + ".", flush=True)
        for line in fit_advice(config, result, len(devices)):
          print(line, flush=True)
        out.append({"topology": topo, "dtype": dtype, "fit": {
            "largest_batch_per_device": best.batch_per_device if best else 0,
            "limit": None if limit is None else dataclasses.asdict(limit),
            "fixed_bytes": result.fixed_bytes,
            "bytes_per_image": result.bytes_per_image,
            "tries": [dataclasses.asdict(t) for t in result.tries]}})
      continue
    print(HEADER, flush=True)
    for kind in fv.steps:
      try:
        reports = aot.compile_steps(config, devices, chip, topo,
                                    num_classes=num_classes, kinds=(kind,))
      except aot.DoesNotFit as e:
        print(f"{kind:<8}does not fit: {e}", flush=True)
        out.append({"topology": topo, "kind": kind, "fits": False,
                    "error": str(e)})
        status = 1
        continue
      for report in reports:  # none: the task has no such step
        print(format_report(report), flush=True)
        if report.note:
          print(f"  {report.note}", flush=True)
        if kind == "train" and report.batch_per_device >= 1:
          fixed, per_image, batch = fit_lib.estimate(report)
          print(f"  memory line from this compile: {_gib(fixed)} GiB + "
                f"{_gib(per_image)} GiB per image: at most {batch} images "
                "per device before the HBM is full (an estimate; XLA may "
                "rematerialise earlier: --fit compiles to find the edge)",
                flush=True)
        out.append(dict(dataclasses.asdict(report), fits=True))
  print("Times are roofline lower bounds from the compiled program "
        "(collectives and input not modelled), not measurements.")
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump(out, f, indent=1)
  return status


def main(argv=None) -> int:
  """Command line; see the module docstring."""
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.aot")


if __name__ == "__main__":
  sys.exit(main())
