"""Runs survive any kill: SIGKILL inside a checkpoint write and at a random
step, SIGTERM, each followed by a restart, end with the parameters of the
uninterrupted run; a live run's workdir is locked."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from brnpa_jax.runs import RunError, Workdir, restore_variables
from brnpa_jax.runs.checkpoints import FAULT_ENV

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _names(workdir) -> list[str]:
  d = os.path.join(workdir, "checkpoints")
  return os.listdir(d) if os.path.isdir(d) else []


def _steps(workdir) -> list[int]:
  """The complete checkpoint steps."""
  return sorted(int(n) for n in _names(workdir) if n.isdigit())


def _killed_inside_a_write(cmd, env, workdir, step):
  """Runs with the checkpoint writer's fault point at ``step``: the process
  kills itself after writing that step's files, before committing them."""
  env = dict(env, **{FAULT_ENV: f"checkpoint_save:{step}"})
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
  names = _names(workdir)
  assert str(step) not in names, names  # never committed
  assert any(n.startswith(f"{step}.") and "tmp" in n for n in names), names
  assert max(_steps(workdir)) == step - 1
  return step - 1


def _interrupt(cmd, env, workdir, sig, rng):
  """Starts the run and sends ``sig`` once a checkpoint 1 to 3 steps past
  the newest one exists. Returns (return code, output, newest complete
  step at the signal)."""
  target = max(_steps(workdir), default=0) + rng.randint(1, 3)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while (time.time() < deadline and proc.poll() is None
         and max(_steps(workdir), default=0) < target):
    time.sleep(0.002)
  # The run has 16 steps and the last signal is due by step 10 at the
  # latest: a run that finished first fails here.
  assert proc.poll() is None, proc.communicate()[0]
  newest = max(_steps(workdir), default=0)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out, newest


def _resumed_from(log: str) -> int:
  return int(log.split("Resumed from step")[1].split()[0].rstrip("."))


def test_kills_and_restarts_end_like_an_uninterrupted_run(finished_run,
                                                          tfds_dir, tmp_path):
  """A SIGKILL inside a checkpoint write (the writer's fault point), then
  SIGTERM and SIGKILL at random steps, each followed by a restart: the run
  ends with the parameters of the session's uninterrupted run. Checkpoints
  every step (what is trained does not depend on it)."""
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "train.py", "--config", "configs/default.py:runlocal",
         f"--config.data.data_dir={tfds_dir}", "--config.mesh.num_devices=1",
         "--config.checkpoint_every_steps=1", f"--workdir={workdir}"]
  env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
  env["PYTHONUNBUFFERED"] = "1"
  rng = random.Random(0)
  last_stop = _killed_inside_a_write(cmd, env, workdir, step=3)
  for sig in (signal.SIGTERM, signal.SIGKILL):
    code, out, newest = _interrupt(cmd, env, workdir, sig, rng)
    # Known exactly: after the kill inside step 3's write, the last commit
    # (step 2); after SIGTERM, the step it stopped at.
    assert _resumed_from(out) == last_stop, out
    if sig == signal.SIGTERM:  # a clean stop, with its own checkpoint
      assert code == 0 and "Stopped at step" in out, out
      last_stop = int(out.split("Stopped at step")[1].split(";")[0])
      assert last_stop in _steps(workdir)
    else:
      assert code == -signal.SIGKILL, out
      last_stop = newest
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=400)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "test_accuracy" in done.stdout
  # The last restart resumes too, it does not start over.
  assert _resumed_from(done.stdout + done.stderr) >= last_stop
  # Each epoch was evaluated (once or, when a kill hit between an evaluation
  # and its checkpoint, again), none skipped.
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert sorted({r["step"] for r in rows if "val_accuracy" in r}) == [8, 16]
  ours, step, _ = restore_variables(workdir, "latest")
  ref, ref_step, _ = restore_variables(str(finished_run.workdir), "latest")
  assert step == ref_step
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_live_run_holds_its_workdir(tfds_dir, tmp_path):
  wd = Workdir(str(tmp_path / "run"))
  with wd.lock():
    with pytest.raises(RunError, match=rf"in use by another training process "
                       rf"\(pid {os.getpid()} on "):
      with Workdir(wd.path).lock():
        pass
  # The lock dies with its holder: a killed run leaves no stale lock.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from brnpa_jax.runs import "
       "Workdir\nwith Workdir(sys.argv[1]).lock():\n  print('held', flush=True)"
       "\n  time.sleep(60)", wd.path],
      cwd=REPO, stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(RunError, match=f"pid {holder.pid}"):
    with wd.lock():
      pass
  holder.kill()
  holder.wait()
  with wd.lock():
    assert f"pid {os.getpid()}" in open(wd.file(".lock")).read()
