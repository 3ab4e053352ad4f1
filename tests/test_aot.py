"""Ahead-of-time compilation of the train step for TPU topologies, no TPU.

Needs the ``tpu`` extra (libtpu, XLA's TPU compiler); skipped without it.
Compiles the train step of ``configs/default.py:runlocal`` (resnet_tiny,
64 px) once per layout: v5e slices of 4 chips (data parallel and fsdp=2) and
8 chips (data parallel, two hosts). The model is widened from 8 to 64
channels: the TPU lays arrays out in tiles of 128 lanes, so at width 8 a
kernel and its half are padded to the same tiles and sharding saves a third
of the state, not half.
"""

import dataclasses
import pathlib

import jax
import pytest

from brnpa_jax.errors import ConfigError, UserError
from brnpa_jax.tools import aot as aot_tool
from brnpa_jax.train import aot, chips
from configs import default

DEFAULT_CONFIG = str(pathlib.Path(__file__).parents[1] / "configs" / "default.py")


@pytest.fixture(scope="module")
def libtpu():
  # conftest lets test processes share libtpu's machine-wide lock.
  pytest.importorskip("libtpu", reason="needs the tpu extra (libtpu): pip "
                      "install -r requirements-tpu.txt -c constraints.txt")

GLOBAL_BATCH = 16  # 4 and 2 images per chip on 4 and 8 chips


def _config(fsdp=1, batch=GLOBAL_BATCH):
  c = default.get_config("runlocal")
  c.unlock()
  c.mesh.fsdp, c.batch_size, c.eval_batch_size = fsdp, batch, batch
  c.model.width = 64
  c.lock()
  return c


@dataclasses.dataclass
class Compiled:
  report: aot.StepReport
  state_argument_bytes: int  # the state alone, in the TPU's layout


@pytest.fixture(scope="module")
def compiled(libtpu):  # pylint: disable=unused-argument,redefined-outer-name
  """(topology, fsdp) -> the train step compiled (a few seconds each)."""
  out = {}
  for topology, fsdp in [("v5e:2x2", 1), ("v5e:2x2", 2), ("v5e:2x4", 1)]:
    chip, name, devices = aot.topology(topology)
    config = _config(fsdp)
    (report,) = aot.compile_steps(config, devices, chip, name,
                                  num_classes=aot.num_classes_of(config),
                                  kinds=("train",))
    out[topology, fsdp] = Compiled(report, _state_argument_bytes(config, devices))
  return out


def _state_argument_bytes(config, devices) -> int:
  """Per-device argument bytes of the train state alone (params, batch
  stats, optimiser state) as the TPU compiler lays them out: a program that
  takes the state in its shardings and returns nothing of size."""
  from brnpa_jax.runs import abstract_like  # pylint: disable=g-import-not-at-top
  from brnpa_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  from brnpa_jax.train import program  # pylint: disable=g-import-not-at-top
  layout = program.make_layout(config, devices)
  prog = program.build_program(config, get_task(config), layout, num_classes=10,
                               steps_per_epoch=1, with_context=False)
  state = abstract_like(prog.steps.state_shapes, prog.steps.state_sharding)
  compiled = jax.jit(lambda s: s.step, keep_unused=True).lower(state).compile()
  return compiled.memory_analysis().argument_size_in_bytes


def test_fsdp_halves_the_state_per_chip(compiled):
  dp, fsdp = compiled["v5e:2x2", 1], compiled["v5e:2x2", 2]
  # The state's own per-device bytes (from the shardings, then as laid out
  # on the TPU) halve, up to the leaves no dimension of which divides by 2.
  assert 0.48 < fsdp.report.state_bytes / dp.report.state_bytes < 0.55
  ratio = fsdp.state_argument_bytes / dp.state_argument_bytes
  assert 0.45 < ratio < 0.6, ratio
  # ...and the train step's argument memory drops by exactly that much:
  # its other arguments (batch, rng) are the same.
  saved = dp.report.argument_bytes - fsdp.report.argument_bytes
  assert saved == dp.state_argument_bytes - fsdp.state_argument_bytes


def test_flops_per_chip_halve_when_chips_double(compiled):
  flops = [compiled[t, 1].report.flops for t in ("v5e:2x2", "v5e:2x4")]
  for more, fewer in zip(flops[1:], flops[:-1]):
    assert 0.45 < more / fewer < 0.55, flops


def test_report_is_consistent(compiled):
  r = compiled["v5e:2x4", 1].report
  assert (r.devices, r.hosts, r.batch_per_device) == (8, 2, 2)
  assert r.total_bytes == (r.argument_bytes + r.output_bytes - r.alias_bytes
                           + r.temp_bytes + r.code_bytes)
  assert r.alias_bytes > 0  # the donated state is reused for the new one
  assert r.compute_seconds == pytest.approx(r.flops / chips.CHIPS["v5e"].peak_flops)
  assert r.memory_seconds == pytest.approx(
      r.bytes_accessed / chips.CHIPS["v5e"].hbm_bandwidth)
  assert r.roofline_seconds == max(r.compute_seconds, r.memory_seconds)
  assert r.images_per_second_slice == pytest.approx(
      8 * r.images_per_second_device)
  assert 0 < r.hbm_share < 0.1


def test_batch_that_does_not_divide_is_refused_as_in_train(libtpu):  # pylint: disable=unused-argument,redefined-outer-name
  chip, name, devices = aot.topology("v5e:4x4")
  with pytest.raises(ConfigError, match="divisible by the 16 devices"):
    aot.compile_steps(_config(batch=12), devices, chip, name, num_classes=10)
  with pytest.raises(ConfigError, match="must divide the 16 devices"):
    aot.compile_steps(_config(fsdp=3), devices, chip, name, num_classes=10)


def test_topology_names():
  """Parsed without libtpu."""
  assert chips.parse_topology("v5e-16")[1] == "v5e:4x4"
  assert chips.parse_topology("v4-8")[1] == "v4:2x2x1"
  assert chips.parse_topology("v5p-8")[1] == "v5p:2x2x1"
  with pytest.raises(ValueError, match="v5e:2x2"):  # lists the accepted names
    chips.parse_topology("v9:2x2")
  with pytest.raises(ValueError, match="crashes"):
    chips.parse_topology("v6e:2x2")


def test_unbuildable_topology_lists_the_accepted(libtpu):  # pylint: disable=unused-argument,redefined-outer-name
  with pytest.raises(UserError, match="use v4:2x2x1"):
    aot.topology("v5e:3x3")  # the compiler's own refusal


ARGS = ["--config", DEFAULT_CONFIG + ":runlocal", "--steps", "train"]


def test_missing_libtpu_names_the_extra(monkeypatch, capsys):
  monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
  assert aot_tool.main(ARGS + ["--topology", "v5e:2x2"]) == 2
  err = capsys.readouterr().err
  assert "tpu` extra" in err and "requirements-tpu.txt" in err
  assert aot_tool.main(ARGS + ["--topology", "v5e:5x5x5x5"]) == 2
  assert "use v4:2x2x1..4x4x4, v5e:2x2" in capsys.readouterr().err


def test_command_line_refuses_a_batch_as_train_does(libtpu, capsys):  # pylint: disable=unused-argument,redefined-outer-name
  args = ARGS
  assert aot_tool.main(args + ["--topology", "v5e:4x4",
                               "--config.batch_size=12"]) == 2
  err = capsys.readouterr().err
  assert "batch_size=12 must be divisible by the 16 devices" in err
  assert len(err.strip().splitlines()) <= 3


def test_fit_search_finds_the_edge_in_few_compiles(monkeypatch):
  """The search on a fake compiler: memory affine in the batch, XLA
  rematerialising above 90% of HBM, out of memory above 100%."""
  from brnpa_jax.train import fit  # pylint: disable=g-import-not-at-top
  chip = chips.CHIPS["v5e"]
  gib = chips.GiB
  compiled_batches = []

  def fake_compile(config, devices, chip, name, *, num_classes, kinds):
    del num_classes, kinds
    b = config.batch_size // len(devices)
    compiled_batches.append(b)
    total = 2.1 * gib + 0.56 * gib * b
    if total > chip.hbm_bytes:
      raise aot.DoesNotFit("RESOURCE_EXHAUSTED")
    flops = 0.46e12 * b * (1.05 if total > 0.9 * chip.hbm_bytes else 1.0)
    fields = {f.name: 0 for f in dataclasses.fields(aot.StepReport)}
    fields.update(kind="train", topology=name, dtype=config.dtype,
                  batch_per_device=b, total_bytes=total, flops=flops,
                  argument_bytes=0.3 * gib, output_bytes=0.2 * gib,
                  alias_bytes=0.2 * gib, code_bytes=0.05 * gib,
                  state_bytes=0.2 * gib, hbm_bytes=chip.hbm_bytes)
    return [aot.StepReport(**fields)]

  monkeypatch.setattr(aot, "compile_steps", fake_compile)
  result = fit.search(_config(), [object()] * 4, chip, "v5e:2x2",
                      num_classes=10, dtype="float32", log=lambda _: None)
  # 0.9 * 16 GiB = 14.4 GiB: 22 images (14.42) rematerialise, 21 do not;
  # at the granularity of 4: 20 fits, 24 does not.
  assert result.best.batch_per_device == 20
  assert result.limit.batch_per_device == 24 and result.limit.rematerialised
  assert len(compiled_batches) <= 4, compiled_batches
  assert result.bytes_per_image == pytest.approx(0.56 * gib)
  # One compile's conservative line: everything but arguments, outputs,
  # code and a state-sized gradient counts per image.
  fixed, per_image, batch = fit.estimate(result.best.report)
  assert fixed == pytest.approx((0.3 + 0.05 + 0.2) * gib)
  assert per_image == pytest.approx((2.1 + 0.56 * 20 - 0.55) * gib / 20)
  # Below where memory runs out (24.8), but blind to rematerialisation:
  # an estimate for choosing --fit_start, not an answer.
  assert batch == 24
