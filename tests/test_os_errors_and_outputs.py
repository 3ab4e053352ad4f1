"""The operating system's errors at the boundary, outputs that a failed run
never changes, and a quiet start.

Read-only and full file systems are real where the machine allows: a
read-only or small tmpfs where the tests may mount one (root with mount
rights), permission bits for other users; a full disk is otherwise a file-size
limit (``RLIMIT_FSIZE``, any user: writes then fail with EFBIG). The boundary's
mapping of every errno is tested with raised errors.
"""

import contextlib
import csv
import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import train
from brnpa_jax import cli, export, outputs, predict, quiet
from brnpa_jax.explain import evaluate
from brnpa_jax.runs import Checkpointer, restore_variables
from brnpa_jax.train.writers import create_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "configs", "default.py")


def _user_error(capsys, status, *needles) -> str:
  """Status 2 and one line on stderr, holding every needle."""
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.strip()]
  assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
  for needle in needles:
    assert needle in err, err
  return err


def _snapshot(folder) -> dict[str, bytes]:
  """Every file under ``folder`` (hidden ones too) with its bytes."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = open(path, "rb").read()
  return out


def _temporaries(folder) -> list[str]:
  return [n for n in os.listdir(folder) if "tmp" in n]


def _mount_tmpfs(path, options: str) -> bool:
  """Mounts a tmpfs at ``path``; False where this process may not."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                         str(path)], capture_output=True).returncode == 0


def _umount(path) -> None:
  subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- the boundary's mapping -------------------------------------------------------
@pytest.mark.parametrize("code", sorted(cli.OS_ERRORS))
def test_each_os_error_is_one_line_naming_the_path(code, capsys):
  def main(fv):
    del fv
    raise OSError(code, os.strerror(code), "/data/run")

  status = cli.run(lambda fv, argv: None, main, argv=[], prog="tool")
  _user_error(capsys, status, "tool: /data/run: ", cli.OS_ERRORS[code])


def test_other_os_errors_and_internal_errors(capsys):
  def raising(e):
    def main(fv):
      del fv
      raise e
    return lambda *argv: cli.run(lambda fv, a: None, main, argv=list(argv),
                                 prog="tool")

  status = raising(OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/a/b"))()
  _user_error(capsys, status, "/a/b: Too many levels of symbolic links")
  status = raising(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))()
  _user_error(capsys, status, "No space left on the device")
  status = raising(OSError(errno.EACCES, "denied", "/x"))("--verbose")
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" in err and "/x: permission denied" in err
  # Without a path, an OS error that says nothing about the user's files is
  # internal (it keeps its traceback, status 1), as is everything else.
  with pytest.raises(BrokenPipeError):
    raising(BrokenPipeError(errno.EPIPE, "Broken pipe"))()
  with pytest.raises(RuntimeError):
    raising(RuntimeError("a bug"))()


# -- read-only and misnamed outputs, checked before any work ------------------------------
@pytest.fixture
def read_only(tmp_path):
  """A real read-only folder: a read-only tmpfs (root), else permissions."""
  folder = tmp_path / "ro"
  if _mount_tmpfs(folder, "ro,size=64k"):
    yield str(folder), "read-only file system"
    _umount(folder)
  elif os.geteuid() != 0:
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    yield str(folder), "permission denied"
    folder.chmod(0o755)
  else:
    pytest.skip("root without mount rights: permission bits do not apply "
                "(the mapping is tested with raised errors above)")


@pytest.fixture
def no_restore(monkeypatch):
  """Restoring a run fails the test: outputs must be checked before."""
  def restore(*args, **kwargs):
    raise AssertionError("the run was restored before --out was checked")
  for module in (predict, export, evaluate):
    monkeypatch.setattr(module, "load_run", restore)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(3):  # one batch of 3
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(
        folder / f"img{i}.png")
  return str(folder)


def _predict(workdir, images, out, *extra):
  return predict.main(["--workdir", str(workdir), "--images", images, "--out",
                       str(out), "--batch", "3", *extra])


def test_bad_out_fails_before_the_run_is_restored(finished_run, images, tmp_path,
                                                  capsys, no_restore):
  wd = str(finished_run.workdir)
  a_file = tmp_path / "a_file"
  a_file.write_text("mine")
  _user_error(capsys, _predict(wd, images, a_file), f"{a_file}: not a folder")
  _user_error(capsys, _predict(wd, images, a_file / "preds"),
              f"{a_file}/preds: not a folder")
  _user_error(capsys, evaluate.main(["--workdir", wd, "--out", str(a_file)]),
              f"{a_file}: not a folder")
  _user_error(capsys, export.main(["--workdir", wd, "--out", str(tmp_path)]),
              f"{tmp_path}: is a folder")
  _user_error(capsys, export.main(["--workdir", wd, "--out",
                                   str(tmp_path / ("x" * 300))]),
              "file name too long")
  # A user's own folder is never emptied.
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  _user_error(capsys, _predict(wd, images, mine), "did not write (notes.txt)")
  assert _snapshot(mine) == {"notes.txt": b"keep me"}
  assert sorted(os.listdir(tmp_path)) == ["a_file", "mine"]  # nothing left


def test_read_only_out_and_workdir(finished_run, images, read_only, tfds_dir,
                                   capsys, no_restore):
  folder, meaning = read_only
  wd = str(finished_run.workdir)
  _user_error(capsys, _predict(wd, images, f"{folder}/preds"), folder, meaning)
  _user_error(capsys, export.main(["--workdir", wd, "--out",
                                   f"{folder}/m.jaxexport"]), folder, meaning)
  _user_error(capsys, evaluate.main(["--workdir", wd, "--out", f"{folder}/e"]),
              folder, meaning)
  status = cli.run(train.define_flags, train.main, prog="train.py", argv=[
      "--config", f"{DEFAULT}:runlocal", f"--config.data.data_dir={tfds_dir}",
      "--config.mesh.num_devices=1", f"--workdir={folder}/run"],
      start_jax=False)
  _user_error(capsys, status, f"train.py: {folder}/run: {meaning}")


# -- a full disk ------------------------------------------------------------------------
class Space:
  """A folder whose space a test exhausts for real, then frees: a small tmpfs
  filled up (ENOSPC) where this process may mount one, else a file-size
  limit on this process (EFBIG: every write past 16 KiB fails)."""

  def __init__(self, root, kind: str = "any"):
    self.path, self.kind = str(root / "fs"), kind
    if kind in ("tmpfs", "any") and _mount_tmpfs(self.path, "size=16m"):
      self.kind = "tmpfs"
    elif kind == "tmpfs":
      pytest.skip("no mount rights for a tmpfs (the file-size limit case runs)")
    else:
      self.kind = "file_size_limit"
    os.makedirs(self.path, exist_ok=True)
    self.errno = errno.ENOSPC if self.kind == "tmpfs" else errno.EFBIG
    self._undo = []

  @property
  def exhausted(self) -> bool:
    return bool(self._undo)

  def exhaust(self) -> None:
    if self.kind == "tmpfs":
      filler = os.path.join(self.path, "filler")
      with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
          f.write(b"\0" * 2**20)
      self._undo.append(lambda: os.unlink(filler))
    else:
      old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      limits = resource.getrlimit(resource.RLIMIT_FSIZE)
      resource.setrlimit(resource.RLIMIT_FSIZE, (2**14, limits[1]))
      self._undo.append(lambda: (resource.setrlimit(resource.RLIMIT_FSIZE, limits),
                                 signal.signal(signal.SIGXFSZ, old)))

  def free(self) -> None:
    while self._undo:
      self._undo.pop()()

  def close(self) -> None:
    self.free()
    if self.kind == "tmpfs":
      _umount(self.path)


@pytest.fixture(params=["tmpfs", "file_size_limit"])
def space(request, tmp_path):
  s = Space(tmp_path, request.param)
  yield s
  s.close()


@pytest.fixture
def any_space(tmp_path):
  """A tmpfs where this process may mount one, else the file-size limit."""
  s = Space(tmp_path)
  yield s
  s.close()


def test_refused_checkpoint_is_one_error_and_leaves_no_temporary(space, capfd):
  workdir = os.path.join(space.path, "run")
  rng = np.random.default_rng(0)  # incompressible: each array is 64 KiB
  state = {f"w{i}": jax.numpy.asarray(rng.random((64, 256), np.float32))
           for i in range(4)}
  ckpt = Checkpointer(workdir)
  ckpt.save(1, state, {"step": 1})
  ckpt.wait_until_finished()
  space.exhaust()
  try:
    with pytest.raises(OSError) as failed:
      ckpt.save(2, state, {"step": 2})
      ckpt.wait_until_finished()
  finally:
    space.free()
  assert (failed.value.errno, failed.value.filename) == (space.errno, workdir)
  ckpt.close()  # nothing left to close, no second error
  for name in ("checkpoints", "best"):
    assert not _temporaries(os.path.join(workdir, name))
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  # Space freed: the complete checkpoint restores and saving goes on.
  ckpt = Checkpointer(workdir)
  assert ckpt.latest_step == 1
  ckpt.save(2, state, {"step": 2})
  ckpt.close()
  assert Checkpointer(workdir).latest_step == 2


def test_refused_metrics_name_the_workdir(space):
  """TensorBoard's and the JSON file's writes on a full disk (clu raises the
  first wrapped, the second has no file name)."""
  workdir = os.path.join(space.path, "run")
  writer = create_writer(workdir)
  writer.write_scalars(0, {"loss": 1.0})
  writer.flush()
  space.exhaust()
  try:
    with pytest.raises(OSError) as failed:
      for step in range(1, 2000):  # past the file-size limit too
        writer.write_scalars(step, {"loss": 1.0, "accuracy": 0.5})
      writer.flush()
  finally:
    space.free()
  assert (failed.value.errno, failed.value.filename) == (space.errno, workdir)


def test_refused_outputs_name_out_and_keep_the_earlier_set(space):
  """predict's and evaluate's npz files on a full disk (written as the tools
  write them: in ``replace_folder``, under ``naming``)."""
  out = os.path.join(space.path, "preds")
  with outputs.replace_folder(out, ["a.npz"]) as staging:
    np.savez_compressed(os.path.join(staging, "a.npz"), a=np.zeros(4))
  earlier = _snapshot(out)
  space.exhaust()
  try:
    with pytest.raises(OSError) as failed:
      with outputs.replace_folder(out, ["a.npz"]) as staging, \
          outputs.naming(out):
        np.savez_compressed(os.path.join(staging, "a.npz"),
                            a=np.random.default_rng(0).random(2**16))
  finally:
    space.free()
  assert (failed.value.errno, failed.value.filename) == (space.errno, out)
  assert _snapshot(out) == earlier and os.listdir(space.path) == ["preds"]


def test_a_killed_save_is_cleaned_up_when_the_run_resumes(tmp_path):
  left = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
  left.mkdir(parents=True)
  (left / "partial").write_bytes(b"\0" * 100)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(4, {"w": jax.numpy.ones(3)}, {"step": 4})
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


@pytest.mark.slow
def test_full_disk_mid_run_ends_in_one_line_and_the_same_command_resumes(
    finished_run, tfds_dir, any_space, monkeypatch, capsys):
  """Space runs out after the step-4 checkpoint (the epoch-end save at step 8
  fails): one line naming the workdir, no temporary checkpoint; once freed,
  the same command resumes from the last complete checkpoint and ends like
  an uninterrupted run."""
  space = any_space
  workdir = os.path.join(space.path, "run")
  save = Checkpointer.save

  def exhaust_after_step_4(self, step, *args, **kwargs):
    if step > 4 and not space.exhausted:
      space.exhaust()
    return save(self, step, *args, **kwargs)

  argv = ["--config", f"{DEFAULT}:runlocal", f"--config.data.data_dir={tfds_dir}",
          "--config.mesh.num_devices=1", f"--workdir={workdir}"]
  run = lambda: cli.run(train.define_flags, train.main, argv=argv,
                        prog="train.py", start_jax=False)
  try:
    with monkeypatch.context() as m:
      m.setattr(Checkpointer, "save", exhaust_after_step_4)
      status = run()
  finally:
    space.free()
  err = capsys.readouterr().err
  own = [l for l in err.splitlines()
         if l.strip() and not re.match(r"epoch \d+/\d+: +\d+%\|", l)]
  assert status == 2 and "Traceback" not in err, err
  assert own == [f"train.py: {workdir}: {cli.OS_ERRORS[space.errno]}."], err
  for name in ("checkpoints", "best"):
    assert not _temporaries(os.path.join(workdir, name))
  assert run() == 0
  out = capsys.readouterr().out
  assert "Resumed from step 4" in out and "test_accuracy" in out, out
  ours, step, _ = restore_variables(workdir, "latest")
  ref, ref_step, _ = restore_variables(str(finished_run.workdir), "latest")
  assert step == ref_step
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- outputs: all or nothing --------------------------------------------------------
@pytest.fixture(scope="module")
def earlier(finished_run, images, tmp_path_factory):
  """A complete earlier predict (with overlays) and its files."""
  out = tmp_path_factory.mktemp("earlier") / "preds"
  assert _predict(finished_run.workdir, images, out, "--overlays",
                  "--topk", "2") == 0
  return out, _snapshot(out)


class _Stop(Exception):
  """SIGTERM that reached the test: the tool did not handle it."""


def test_sigterm_ends_a_tool_through_its_clean_up(tmp_path, capsys):
  out = tmp_path / "out"

  def main(fv):
    del fv
    with outputs.replace_folder(str(out), ["a.txt"]) as staging:
      open(os.path.join(staging, "a.txt"), "w").write("half")
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(100):  # the handler runs at the next instruction
        time.sleep(0.01)

  def unhandled(signum, frame):
    raise _Stop()

  old = signal.signal(signal.SIGTERM, unhandled)
  try:
    status = cli.run(lambda fv, argv: None, main, argv=[], prog="tool",
                     start_jax=False)
  finally:
    assert signal.signal(signal.SIGTERM, old) is unhandled  # restored
  assert status == 143 and capsys.readouterr().err == "tool: terminated\n"
  assert os.listdir(tmp_path) == []  # no partial set, no temporary


@pytest.mark.slow
@pytest.mark.parametrize("how,into", [("error", "earlier"), ("ctrl_c", "new")])
def test_failed_or_interrupted_predict_changes_nothing(
    how, into, finished_run, images, earlier, tmp_path, monkeypatch):
  """An error while the CSV is written (the issue's crash that left an
  earlier CSV truncated to its header) into a folder of earlier results
  (top-2, so that any rewrite shows); Ctrl-C while the overlays are drawn
  (the CSV and npz written) into a new folder."""
  out = tmp_path / "preds"
  if into == "earlier":
    shutil.copytree(earlier[0], out)
  draw, calls, writer = predict.save_overlay_grid, [], csv.writer

  def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return draw(*args, **kwargs)

  class FailingRows:
    def __init__(self, f):
      self._writer = writer(f)

    def writerow(self, row):
      if row[0] != "file":
        raise RuntimeError("cannot encode a file name")
      self._writer.writerow(row)

  if how == "error":
    monkeypatch.setattr(csv, "writer", FailingRows)
    with pytest.raises(RuntimeError):
      _predict(finished_run.workdir, images, out, "--overlays")
  else:
    monkeypatch.setattr(predict, "save_overlay_grid", interrupted)
    assert _predict(finished_run.workdir, images, out, "--overlays") == 130
  if into == "earlier":
    assert _snapshot(out) == earlier[1]
    assert os.listdir(tmp_path) == ["preds"]  # and no temporary
  else:
    assert os.listdir(tmp_path) == []  # no partial set, no temporary


@pytest.mark.slow
def test_two_predicts_into_one_out_do_not_mix(finished_run, images, tmp_path,
                                             monkeypatch):
  """A second predict (top-3) runs whole while the first (top-2) writes its
  npz: the first, finishing last, wins, with all of its files."""
  out = tmp_path / "preds"
  savez, nested = np.savez_compressed, []

  def meanwhile(*args, **kwargs):
    if not nested:
      nested.append(1)
      assert _predict(finished_run.workdir, images, out, "--topk", "3") == 0
    return savez(*args, **kwargs)

  monkeypatch.setattr(np, "savez_compressed", meanwhile)
  assert _predict(finished_run.workdir, images, out, "--topk", "2") == 0
  header = open(out / "predictions.csv").readline().strip().split(",")
  with np.load(out / "maps.npz") as z:
    assert header[-2:] == ["class_2", "prob_2"] and z["topk_classes"].shape[1] == 2
  assert sorted(os.listdir(tmp_path)) == ["preds"]


def test_swap_without_an_atomic_exchange(tmp_path, monkeypatch):
  """Where the file system has no exchange, the earlier set is renamed aside
  and put back if a kill comes between the two renames."""
  monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
  out = str(tmp_path / "out")
  for text in ("one", "two"):
    with outputs.replace_folder(out, ["a.txt"]) as staging:
      open(os.path.join(staging, "a.txt"), "w").write(text)
  assert _snapshot(out) == {"a.txt": b"two"}
  os.rename(out, str(tmp_path / ".out.brnpa-tmp-1234abcd.old"))
  outputs.remove_stale(out)
  assert _snapshot(out) == {"a.txt": b"two"} and os.listdir(tmp_path) == ["out"]


def test_a_killed_writer_leaves_only_a_hidden_temporary(tmp_path):
  out = tmp_path / "out"
  with outputs.replace_folder(str(out), ["a.txt", "b.txt"]) as staging:
    open(os.path.join(staging, "a.txt"), "w").write("earlier")
  script = (
      "import os, signal, sys\n"
      "from brnpa_jax import outputs\n"
      "with outputs.replace_folder(sys.argv[1], ['a.txt', 'b.txt']) as s:\n"
      "  open(os.path.join(s, 'a.txt'), 'w').write('half')\n"
      "  os.kill(os.getpid(), signal.SIGKILL)\n")
  done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert done.returncode == -signal.SIGKILL
  assert _snapshot(out) == {"a.txt": b"earlier"}
  (left,) = _temporaries(tmp_path)
  assert left.startswith(".out.")
  # The next write there removes it; a live writer's temporary is kept.
  with outputs.replace_folder(str(out), ["a.txt"]) as live:
    assert outputs.remove_stale(str(out)) == []
    assert _temporaries(tmp_path) == [os.path.basename(live)]
  assert os.listdir(tmp_path) == ["out"]


# -- a quiet start -----------------------------------------------------------------------
NOISE = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796683467.473570    7259 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so may not properly initialize.
WARNING: Logging before InitGoogle() is written to STDERR
E0000 00:00:1796683525.221753    8175 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker hostname 'WARNING: could not determine TPU worker hostnames or IP addresses' from env var TPU_WORKER_HOSTNAMES. Expecting a valid hostname or IP address without port number, or hostname:port:address triple.
=== Source Location Trace: === 
learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327
"""


def test_start_up_noise_is_dropped_and_everything_else_kept(capfd):
  real = ("E0000 00:00:1.0 1 common_lib.cc:554] INVALID_ARGUMENT: Error: "
          "unexpected worker hostname 'tpu-7' from env var TPU_WORKER_HOSTNAMES.\n"
          "=== Source Location Trace: ===\n"
          "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327\n")
  assert quiet.filter_noise(NOISE) == ""
  assert quiet.filter_noise(NOISE + real + NOISE) == real
  with quiet.filtered_stderr():
    os.write(2, (NOISE + "F0000 a real fatal line\n").encode())
    print("python's own warning", file=sys.stderr)
  assert sorted(capfd.readouterr().err.splitlines()) == [
      "F0000 a real fatal line", "python's own warning"]


def test_tensorflow_is_imported_through_quiet_only():
  offenders = []
  for root, _, files in os.walk(os.path.join(REPO, "brnpa_jax")):
    for name in files:
      path = os.path.join(root, name)
      if name.endswith(".py") and name != "quiet.py":
        text = open(path).read()
        if "import tensorflow\n" in text or "import tensorflow as" in text:
          offenders.append(os.path.relpath(path, REPO))
  assert not offenders, offenders


@pytest.mark.slow
def test_tools_print_nothing_before_their_own_first_line(finished_run, tfds_dir,
                                                         tmp_path):
  """Fresh interpreters, as a user starts them (TensorFlow and jax loaded
  from scratch, libtpu's probe where it is installed): train.py on a
  finished run, whose first output is its summary, and export's one-line
  error for a missing run (the issue's "five lines on screen")."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run.workdir, workdir)
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  commands = {
      "train": [sys.executable, "train.py", "--config", f"{DEFAULT}:runlocal",
                f"--config.data.data_dir={tfds_dir}",
                "--config.mesh.num_devices=1", f"--workdir={workdir}"],
      "export": [sys.executable, "-m", "brnpa_jax.export", "--workdir",
                 str(tmp_path / "missing"), "--out", str(tmp_path / "m")]}
  procs = {k: subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
           for k, c in commands.items()}
  done = {k: p.communicate(timeout=300) + (p.returncode,) for k, p in procs.items()}
  out, err, code = done["train"]
  assert (code, err) == (0, "") and out.startswith("\nSummary ("), out + err
  out, err, code = done["export"]
  assert code == 2 and out == "" and len(err.splitlines()) == 1, out + err
  assert err.startswith("python -m brnpa_jax.export: ") and "missing" in err, err
