"""Two processes on localhost (4 fake CPU devices each, gloo collectives)
train the same run as one process with 8 devices."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from brnpa_jax.data import input_pipeline
from brnpa_jax.runs import abstract_like
from brnpa_jax.train.trainer import Trainer, train_and_evaluate
from helpers import tiny_config, xla_flags

pytestmark = pytest.mark.slow  # trains or compiles end to end
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The gap head: BR-NPA's argmax can flip on a float-rounding near-tie between
# different reduction orders, after which two correct runs diverge. SGD: Adam
# divides tiny gradients by their own scale, which magnifies rounding noise.
OVERRIDES = {"model.head": "gap", "num_epochs": 1, "data.process_split": "slice",
             "mesh.num_devices": 0, "optim.name": "sgd", "optim.lr": 0.05,
             "num_overlays": 0}  # no end-of-run pictures: one program less


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _final_params(cfg, workdir):
  trainer = Trainer(cfg, str(workdir))
  try:
    state, _ = trainer.ckpt.restore_latest(
        abstract_like(trainer.state_shapes, trainer.state_sharding))
    return jax.device_get(state)
  finally:
    trainer.close()


def test_two_processes_equal_one_process(tmp_path_factory, tfds_dir):
  data_dir = tfds_dir
  cfg = tiny_config(data_dir, **OVERRIDES)
  input_pipeline.get_builder(cfg.data)  # built once, before the processes start

  single_dir = tmp_path_factory.mktemp("single")
  assert jax.device_count() == 8
  train_and_evaluate(cfg, str(single_dir))

  multi_dir = tmp_path_factory.mktemp("multi")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "train.py", "--config", "configs/default.py:runlocal,head=gap,epochs=1",
         f"--config.data.data_dir={data_dir}", "--config.data.process_split=slice",
         "--config.optim.name=sgd", "--config.optim.lr=0.05",
         "--config.num_overlays=0", f"--workdir={multi_dir}", "--multiprocess",
         f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=420)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "on 8 devices" in outs[0]  # one global mesh over both processes
  assert "Summary" in outs[0] and "Summary" not in outs[1]  # process 0 reports

  single, multi = _final_params(cfg, single_dir), _final_params(cfg, multi_dir)
  assert int(single.step) == int(multi.step) == 8
  for a, b in zip(jax.tree.leaves((single.params, single.batch_stats)),
                  jax.tree.leaves((multi.params, multi.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_killed_process_ends_the_other_within_the_heartbeat_timeout(
    tmp_path, tfds_dir):
  """SIGKILL on process 1 once a training step's checkpoint is committed:
  process 0 does not hang on its next collective but exits with the
  distributed runtime's error."""
  cfg = tiny_config(tfds_dir, **OVERRIDES)
  input_pipeline.get_builder(cfg.data)
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "train.py", "--config",
         "configs/default.py:runlocal,head=gap,epochs=50",
         f"--config.data.data_dir={tfds_dir}", "--config.data.process_split=slice",
         "--config.checkpoint_every_steps=1", f"--workdir={workdir}",
         "--multiprocess", f"--coordinator_address=localhost:{_free_port()}",
         "--num_processes=2", "--heartbeat_timeout_seconds=10"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  # checkpoints/ exists before the first step; a committed step (one per
  # step here, of 400) means training is under way. The run's program is its
  # own (not the test above's): loaded from the persistent compilation cache,
  # a multi-process CPU program stalled in its collectives (jax 0.10.2).
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 400
  while not (ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts))):
    assert procs[0].poll() is None, procs[0].communicate()[0]
    assert time.time() < deadline, "no training step checkpointed in 400 s"
    time.sleep(0.05)
  assert procs[1].poll() is None
  procs[1].kill()
  killed = time.time()
  out = procs[0].communicate(timeout=120)[0]
  waited = time.time() - killed
  procs[1].wait()
  print(f"\nprocess 0 exited {waited:.1f} s after process 1 was killed")
  assert procs[0].returncode != 0
  assert waited < 60
  # The coordination service's word, or gloo's when the collective in flight
  # broke first (its peer's half of the data never came).
  assert any(m in out for m in ("another task died", "stopped sending heartbeats",
                                "Received data size doesn't match")), out


def test_slice_mode_rebuilds_the_global_batches(tfds_dir):
  cfg = tiny_config(tfds_dir,
                    **{"data.process_split": "slice"})
  first = lambda **kw: next(iter(input_pipeline.make_train_dataset(
      cfg.data, seed=0, epoch=1, **kw).as_numpy_iterator()))
  whole = first(batch_size=16)
  halves = [first(batch_size=8, process_index=p, process_count=2) for p in (0, 1)]
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
