"""Test set-up and the fixtures the whole session shares.

8 fake CPU devices (for sharding tests), quiet TensorFlow and JAX's
persistent compilation cache must be set before JAX or TensorFlow start,
hence here. The cache lives in a fresh directory per pytest run: a program
that several tests (or the training processes some tests start and restart)
compile is compiled once. The expensive fixtures are built once per pytest
process and shared by every module: one TFDS data directory (each
parts-dataset config in it is generated once) and one finished tiny training
run.

CI runs the files in two processes (pytest-xdist, ``-n 2 --dist loadfile``:
every file in one process, so module fixtures are built once). They share
the compilation cache (the workers inherit this process's environment) and,
compiling for TPU only, libtpu.
"""

import dataclasses
import os
import pathlib
import tempfile

# The tests' models are tiny, so XLA's compile time, not run time, is most
# of the suite: LLVM's optimisations are turned off (about 40% less CPU time
# on the model tests; the values are the same operations, unoptimised).
COMPILE_FAST = ("--xla_backend_optimization_level=0",
                "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("XLA_FLAGS", " ".join(
    ("--xla_force_host_platform_device_count=8",) + COMPILE_FAST))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="brnpa_jax_test_jit_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# libtpu takes a machine-wide lock; the tests only compile for TPU, so test
# processes (and a sizing run of the AOT tool) may hold it together.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import chex  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  """A run trained to the end: read it, copy it, never write into it."""
  workdir: pathlib.Path
  summary: dict
  config: object


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """The session's TFDS data directory."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tfds_dir) -> FinishedRun:
  """``configs/default.py:runlocal`` (resnet_tiny, 256 training images,
  2 epochs of 8 steps) trained once; its train and eval steps trace once."""
  # pylint: disable=g-import-not-at-top
  from brnpa_jax.explain.figures import draw
  from brnpa_jax.train import steps as steps_lib
  from brnpa_jax.train.trainer import train_and_evaluate
  from helpers import tiny_config

  workdir = tmp_path_factory.mktemp("finished_run")
  config = tiny_config(tfds_dir)
  with pytest.MonkeyPatch.context() as mp:
    for name in ("make_train_step", "make_eval_step"):
      make = getattr(steps_lib, name)
      mp.setattr(steps_lib, name, lambda *a, make=make, **kw:
                 chex.assert_max_traces(make(*a, **kw), n=1))
    summary = train_and_evaluate(config, str(workdir), draw=draw)
  return FinishedRun(workdir, summary, config)


# The files that take longest run first: with two processes taking whole
# files, a long file drawn last would leave the other process idle at the end.
LONGEST_FIRST = ("test_multiprocess.py", "test_sharding.py", "test_gpu_suite.py",
                 "test_chaos.py", "test_train.py", "test_aot.py", "test_fuzz_cli.py",
                 "test_os_errors_and_outputs.py", "test_brnpa.py",
                 "test_explainers.py", "test_models.py", "test_fewshot.py",
                 "test_runs.py", "test_randomisation.py", "test_xai_metrics.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
