"""Runs survive any kill: SIGKILL at random points and inside checkpoint
writes, SIGTERM, each followed by a restart, end with the parameters of the
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

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(workdir) -> tuple[list[int], bool]:
  """Complete checkpoint steps, and whether a write is under way."""
  d = os.path.join(workdir, "checkpoints")
  names = os.listdir(d) if os.path.isdir(d) else []
  done = sorted(int(n) for n in names if n.isdigit())
  return done, any("tmp" in n for n in names)


def _interrupt(cmd, env, workdir, sig, kind, rng):
  """Starts the run; sends ``sig`` at a random step or inside a checkpoint
  write. Returns (return code, output, newest complete step at the signal,
  whether a write was under way then), or None when the run finished first."""
  before = max(_steps(workdir)[0], default=0)
  target = before + rng.randint(1, 4)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline, writing = time.time() + 300, False
  while time.time() < deadline and proc.poll() is None:
    done, writing = _steps(workdir)
    newest = max(done, default=0)
    if (kind == "write" and writing and newest >= before) or (
        kind == "random" and newest >= target):
      break
    time.sleep(0.002)
  if proc.poll() is not None:
    return None, proc.communicate()[0], None, None
  newest = max(_steps(workdir)[0], default=0)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out, newest, writing


def test_kills_and_restarts_end_like_an_uninterrupted_run(finished_run,
                                                          tfds_dir, tmp_path):
  """Checkpoints every step (what is trained does not depend on it), so that
  kills land inside writes; the reference is the session's finished run."""
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "train.py", "--config", "configs/default.py:runlocal",
         f"--config.data.data_dir={tfds_dir}", "--config.mesh.num_devices=1",
         "--config.checkpoint_every_steps=1", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  rng = random.Random(0)
  # Each kind of interruption once (every restart costs a process start):
  # together at most ~12 of the run's 16 steps, so all land before its end.
  plan = [(signal.SIGKILL, "write"), (signal.SIGTERM, "random"),
          (signal.SIGKILL, "random"), (signal.SIGTERM, "write")]
  tried = survived = in_writes = 0
  last_stop, last_sig = 0, None
  for sig, kind in plan:
    code, out, newest, writing = _interrupt(cmd, env, workdir, sig, kind, rng)
    if code is None:
      break  # the run finished before this interruption
    tried += 1
    if last_stop:
      assert "Resumed from step" in out, out
      resumed = int(out.split("Resumed from step")[1].split()[0].rstrip("."))
      assert resumed >= last_stop, out
      if last_sig == signal.SIGTERM:  # a clean stop resumes where it stopped
        assert resumed == last_stop, out
    last_sig = sig
    if sig == signal.SIGTERM:
      assert code == 0 and "Stopped at step" in out, out
      last_stop = int(out.split("Stopped at step")[1].split(";")[0])
      assert last_stop in _steps(workdir)[0]  # its checkpoint was saved
    else:
      assert code == -signal.SIGKILL, out
      last_stop = newest
    in_writes += bool(writing)
    survived += 1
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=400)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "test_accuracy" in done.stdout
  if last_stop:  # the last restart resumes too, it does not start over
    log = done.stdout + done.stderr
    resumed = int(log.split("Resumed from step")[1].split()[0].rstrip("."))
    assert resumed >= last_stop, log
  # Each epoch was evaluated (once or, when a kill hit between an evaluation
  # and its checkpoint, again), none skipped.
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert sorted({r["step"] for r in rows if "val_accuracy" in r}) == [8, 16]
  print(f"\nchaos: {survived}/{tried} interruptions survived, {in_writes} "
        "inside a checkpoint write")
  assert tried == len(plan) and survived == tried and in_writes >= 1
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
