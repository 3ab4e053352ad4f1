"""Seeded fuzzing at the command-line boundary
(docs/reliability.md#fuzzing-the-command-line).

Each test composes bad (and some good) inputs of one class, runs the tools
in-process through ``cli.run`` and checks one invariant per case:

- exit 0, and the tool's outputs complete and correct (checked per tool);
- or exit 2, at most three lines on stderr, no traceback, and nothing that
  existed before changed (every path, its bytes, mode and mtime, links'
  targets: inputs, workdir and ``--out`` alike);
- anything else (exit 1, another status, an exception that escapes
  ``cli.run``, ``SystemExit``) is a violation.

The inputs and outputs of every tool are fuzzed, the training itself is not:
``Trainer.train`` is replaced by a stub, so a case that ``train.py`` or the
sweep accepts goes through every check a run makes before its first step
(config, switches, data, classes, the workdir) and writes its config, and
then stops. ``predict`` and ``export`` run for real on the session's tiny
finished run (``--batch`` fixed, so one compile serves every case).

Every case draws from ``random.Random(f"{class}:{seed}:{i}")``: a failure
names its seed and index, and reruns alone with ``BRNPA_FUZZ_ONLY=i``. CI runs
a fixed budget per class (``BUDGET``); ``BRNPA_FUZZ_SCALE=N`` runs N times as
many cases, ``BRNPA_FUZZ_SEED`` other cases, and ``BRNPA_FUZZ_REPORT=FILE``
appends each class's tally (cases, violations) to ``FILE`` as JSON lines.
"""

import contextlib
import csv
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import time
import traceback

import numpy as np
import pytest
from PIL import Image

import train
from brnpa_jax import cli, export, predict, sweep
from brnpa_jax.data import image_files
from brnpa_jax.explain import evaluate
from brnpa_jax.recipes import embedded
from brnpa_jax.tools import aot
from brnpa_jax.train import trainer
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
DEFAULT = os.path.join(CONFIGS, "default.py")
FOLDER_CONFIG = os.path.join(CONFIGS, "cub_brnpa_lowres.py")

SCALE = float(os.environ.get("BRNPA_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("BRNPA_FUZZ_SEED", "0"))
ONLY = os.environ.get("BRNPA_FUZZ_ONLY")
SHOW = os.environ.get("BRNPA_FUZZ_SHOW")  # print each case's status and line
REPORT = os.environ.get("BRNPA_FUZZ_REPORT")
# Cases per class in CI (about a minute in all on 2 cores).
BUDGET = {"config_values": 40, "switches": 25, "config_files": 30,
          "train_images": 8, "predict_images": 10, "outputs": 12,
          "tool_args": 25, "run_inputs": 10}
MAX_PIXELS = 48 * 48  # the image trees' limit: larger images are "bombs"
PREDICT_BATCH = 4


# -- the invariant -----------------------------------------------------------------
def snapshot(root) -> dict:
  """Every path under ``root`` (links not followed) -> what it holds."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      st = os.lstat(path)
      if os.path.islink(path):
        out[path] = ("link", os.readlink(path))
      elif os.path.isdir(path):
        out[path] = ("dir", st.st_mode)
      else:
        with open(path, "rb") as f:
          digest = hashlib.sha1(f.read()).hexdigest()
        out[path] = ("file", st.st_mode, st.st_mtime_ns, digest)
  return out


def changed(before: dict, after: dict, under=None) -> list[str]:
  """Paths whose entry differs (under one of ``under`` only, if given)."""
  keys = set(before) | set(after)
  if under is not None:
    keys = {k for k in keys if any(k == u or k.startswith(u + os.sep)
                                   for u in under)}
  return sorted(k for k in keys if before.get(k) != after.get(k))


class Fuzz:
  """Runs cases, checks the invariant, tallies violations."""

  def __init__(self, name, capsys):
    self.name, self.capsys = name, capsys
    self.cases, self.violations, self.exits = 0, [], {}

  def indices(self):
    n = max(1, round(BUDGET[self.name] * SCALE))
    if ONLY is not None:
      return [int(ONLY)]
    return range(n)

  def rng(self, i) -> random.Random:
    return random.Random(f"{self.name}:{SEED}:{i}")

  def run(self, i, tool, argv, root, outputs=(), check_ok=None):
    """Runs ``tool`` on ``argv``; ``root`` holds every input and output,
    ``outputs`` are the paths it may write on success, ``check_ok()``
    returns what is wrong with them (None: complete and correct)."""
    self.cases += 1
    before = snapshot(root)
    self.capsys.readouterr()
    problem, status = None, None
    start = time.perf_counter()
    try:
      status = TOOLS[tool](list(argv))
    except SystemExit as e:
      problem = f"SystemExit({e.code!r}) escaped"
    except Exception:  # pylint: disable=broad-except
      problem = "uncaught " + traceback.format_exc().strip().splitlines()[-1]
    err = self.capsys.readouterr().err
    self.exits[str(status)] = self.exits.get(str(status), 0) + 1
    lines = [l for l in err.splitlines() if l.strip()]
    after = snapshot(root)
    if SHOW:
      with self.capsys.disabled():
        print(f"\n{self.name}[{i}] {tool} -> {status} "
              f"({time.perf_counter() - start:.1f} s): {lines[-1:]}")
    inputs = [p for p in before if not any(
        p == o or p.startswith(o + os.sep) for o in outputs)]
    if problem is None and status == 2:
      if len(lines) > 3 or "Traceback" in err:
        problem = f"exit 2 with {len(lines)} lines"
      elif changed(before, after):
        problem = f"exit 2 changed {changed(before, after)[:3]}"
    elif problem is None and status == 0:
      moved = changed(before, after, under=inputs)
      if moved:
        problem = f"exit 0 changed inputs {moved[:3]}"
      elif check_ok is not None:
        problem = check_ok()
    elif problem is None:
      problem = f"exit {status}"
    if problem:
      self.violations.append(
          f"{self.name}[{i}] {tool} {argv!r}: {problem}\n  "
          + "\n  ".join(lines[-6:]))
    return status

  def finish(self):
    if REPORT:
      with open(REPORT, "a") as f:
        f.write(json.dumps({"class": self.name, "seed": SEED, "scale": SCALE,
                            "cases": self.cases, "exits": self.exits,
                            "violations": len(self.violations)}) + "\n")
      with open(REPORT + ".violations", "a") as f:
        f.write("".join(v + "\n" for v in self.violations))
    assert not self.violations, (f"{len(self.violations)} of {self.cases} "
                                 "cases break the invariant:\n"
                                 + "\n".join(self.violations[:20]))


def _train(argv):
  return cli.run(train.define_flags, train.main, argv=argv, prog="train.py")


TOOLS = {"train": _train, "predict": predict.main, "export": export.main,
         "evaluate": evaluate.main, "sweep": sweep.main, "aot": aot.main}


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
  """A run that passes every check stops before its first step."""
  def train_stub(self):
    del self
    return {"best_val_accuracy": 0.5}
  monkeypatch.setattr(trainer.Trainer, "train", train_stub)


@pytest.fixture
def fuzz(request, capsys):
  f = Fuzz(request.node.name.replace("test_", "", 1), capsys)
  yield f
  f.finish()


def _config_json_ok(workdir, expect=None):
  def check():
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      return "exit 0 without config.json"
    with open(path) as f:
      config = json.load(f)
    for key, value in (expect or {}).items():
      node = config
      for part in key.split("."):
        node = node[part]
      if node != value:
        return f"config.json {key}={node!r}, asked for {value!r}"
    return None
  return check


# -- values ------------------------------------------------------------------------
INTS = ["0", "-1", "-4", "1", "2", "3", "7", "64", "1000000000000",
        str(2**63), "-0"]
FLOATS = ["nan", "inf", "-inf", "-nan", "0.0", "-0.5", "1e-3", "0.5", "1.5",
          "1e300", "1e-320", "2.0"]
STRINGS = ["", "abc", "1e3", "None", "[1, 2]", "(3, 4)", "(0, 0)", "(8,)",
           "'x'", "é", "true", "{}", " ", "a,b", "-", "../x", "\\"]
BOOLS = ["true", "false", "True", "0", "1", "yes", "maybe"]


def _value(rng: random.Random) -> str:
  return rng.choice(rng.choice([INTS, FLOATS, STRINGS, BOOLS]))


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


@pytest.fixture(scope="module")
def default_fields():
  """Field -> its value in ``configs/default.py:runlocal``."""
  config = default.get_config("runlocal")
  # The parts dataset's own fields generate a new dataset (validation covers
  # them: tests/test_config_validation.py); the data folder is the case's.
  def get(field):
    node = config
    for part in field.split("."):
      node = node[part]
    return node
  return {f: get(f) for f in sorted(_leaves(config.to_dict()))
          if not f.startswith("data.parts.") and f != "data.data_dir"}


def _plausible(rng, default) -> str:
  """A value of the field's own type, in or near its range."""
  if isinstance(default, bool):
    return rng.choice(["true", "false"])
  if isinstance(default, int):
    return rng.choice(["1", "2", "4", "8", str(default)])
  if isinstance(default, float):
    return rng.choice(["0.1", "0.5", "1e-3", "0.0", str(default)])
  return str(default)


UNKNOWN_FIELDS = ["optim.lrr", "nope", "model.backbone.x", "data.folder.x",
                  "mesh", "model", "optim..lr", "optim.lr.x", ".", ""]


def test_config_values(fuzz, tmp_path, tfds_dir, default_fields):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root = tmp_path / str(i)
    root.mkdir()
    workdir = str(root / "run")
    argv = [f"--config={DEFAULT}:runlocal",
            f"--config.data.data_dir={tfds_dir}", f"--workdir={workdir}"]
    for _ in range(rng.randint(1, 3)):
      field = (rng.choice(UNKNOWN_FIELDS) if rng.random() < 0.1
               else rng.choice(sorted(default_fields)))
      value = (_plausible(rng, default_fields[field])
               if field in default_fields and rng.random() < 0.4
               else _value(rng))
      argv.append(f"--config.{field}={value}")
    rng.shuffle(argv)
    fuzz.run(i, "train", argv, str(root), outputs=[workdir],
             check_ok=_config_json_ok(workdir))


SWITCH_MAP = {"k": "model.num_maps", "width": "model.width",
              "head": "model.head", "backbone": None, "res": "model.res",
              "dtype": "dtype", "init": "model.init", "refine": "model.refine"}


def _switch_string(rng, switches) -> tuple[str, dict]:
  items, expect = [], {}
  for _ in range(rng.randint(0, 4)):
    kind = rng.random()
    key = rng.choice(sorted(switches))
    if kind < 0.1:
      items.append(rng.choice(["heads=bcnn", "bogus", "=3", "==", "k==3",
                               " ", "runlocal=maybe", "é=1", ":", "k=3:4"]))
    elif kind < 0.3:
      items.append(key)  # bare: true
    else:
      default = switches[key]
      if isinstance(default, bool):
        value = rng.choice(BOOLS)
      elif isinstance(default, int) and rng.random() < 0.8:
        value = rng.choice(INTS + ["8", "16"])
      elif isinstance(default, float):
        value = rng.choice(FLOATS)
      else:
        value = rng.choice(STRINGS + ["brnpa", "bcnn", "gap", "low", "high",
                                      "resnet_tiny", "bfloat16", "random"])
      items.append(f"{key}={value}")
  if rng.random() < 0.7:
    items.insert(rng.randint(0, len(items)), "runlocal")
  for item in items:  # the switches that must reach the config as given
    key, sep, value = item.partition("=")
    if sep and SWITCH_MAP.get(key) and key not in ("refine",):
      try:
        expect[SWITCH_MAP[key]] = (int(value) if isinstance(switches[key], int)
                                   else value)
      except ValueError:
        pass
  return ",".join(items), expect


def test_switches(fuzz, tmp_path, tfds_dir):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root = tmp_path / str(i)
    root.mkdir()
    workdir = str(root / "run")
    arg, expect = _switch_string(rng, embedded.SWITCHES)
    if "runlocal" not in arg.split(","):
      expect = {}  # a full-size config: refused or accepted, not compared
    # The runlocal sizes of the data whatever the switches: one dataset.
    argv = ["--config", f"{DEFAULT}:{arg}",
            f"--config.data.data_dir={tfds_dir}", f"--workdir={workdir}",
            "--config.data.parts.train_size=256",
            "--config.data.parts.validation_size=64",
            "--config.data.parts.test_size=64"]
    fuzz.run(i, "train", argv, str(root), outputs=[workdir],
             check_ok=_config_json_ok(workdir, expect))


# -- config files ------------------------------------------------------------------
# Runlocal unless a case gives switches: the session's dataset, not a new one.
GOOD_FILE = ("from configs import default\n\ndef get_config(arg=None):\n"
             "  return default.get_config(arg or 'runlocal')\n")


def _config_file(rng, folder) -> str:
  """A config file (or path) with one defect; returns the --config value."""
  path = os.path.join(folder, rng.choice(["c.py", "my config.py", "c.txt",
                                          "ü.py", "c"]))
  with open(DEFAULT) as f:
    default_text = f.read()
  defect = rng.randrange(18)
  text = None
  if defect == 0:  # a syntax error somewhere in a real config
    lines = default_text.splitlines()
    at = rng.randrange(len(lines))
    lines.insert(at, rng.choice(["def (", ")", "  x = = 1", "\tif", "return ]",
                                 "'''"]))
    text = "\n".join(lines)
  elif defect == 1:
    text = "from configs import default\nCONFIG = default.get_config()\n"
  elif defect == 2:
    ret = rng.choice(["None", "3", "[1]", "'text'", "ml_collections", "{1, 2}",
                      "lambda: 1", "default.get_config"])
    text = f"import ml_collections\nfrom configs import default\n\n" \
           f"def get_config(arg=None):\n  return {ret}\n"
  elif defect == 3:
    exc = rng.choice(["ValueError('bad')", "KeyError('k')", "SystemExit(0)",
                      "SystemExit(3)", "RecursionError()", "ImportError('x')",
                      "ZeroDivisionError()", "OSError(28, 'No space')",
                      "FileNotFoundError(2, 'No such file', 'x.csv')",
                      "Exception()", "MemoryError()",
                      "UnicodeDecodeError('utf-8', b'\\xff', 0, 1, 'bad')"])
    where = rng.choice(["module", "function"])
    text = (f"raise {exc}\n" if where == "module" else
            f"def get_config(arg=None):\n  raise {exc}\n")
  elif defect == 4:
    text = "import no_such_module_xyz\n" + GOOD_FILE
  elif defect == 5:
    return path  # missing
  elif defect == 6:
    os.makedirs(path)
    return path  # a folder
  elif defect == 7:
    with open(path, "wb") as f:
      f.write(b"# \xff\xfe caf\xe9\n" + GOOD_FILE.encode())
    return path
  elif defect == 8:
    text = ""
  elif defect == 9:
    with open(path, "wb") as f:
      f.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))))
    return path
  elif defect == 10:  # get_config without the arg it is given
    text = "from configs import default\n\ndef get_config():\n" \
           "  return default.get_config('runlocal')\n"
    return _write(path, text) + ":runlocal"
  elif defect == 11:  # a dict: validated as a config
    text = ("def get_config(arg=None):\n  return "
            + rng.choice(["{}", "{'batch_size': 4}",
                          "{'task': 'classification', 'seed': -1}"]) + "\n")
  elif defect == 12:  # required fields deleted
    drop = rng.sample(["batch_size", "optim", "model", "seed", "dtype", "mesh",
                       "data", "num_epochs"], rng.randint(1, 3))
    text = ("from configs import default\n\ndef get_config(arg=None):\n"
            "  c = default.get_config(arg or 'runlocal')\n  c.unlock()\n"
            + "".join(f"  del c[{k!r}]\n" for k in drop) + "  return c\n")
  elif defect == 13:  # a config whose values are out of range
    field, value = rng.choice([("batch_size", "0"), ("optim.lr", "float('nan')"),
                               ("model.num_maps", "10**6"), ("num_epochs", "-1"),
                               ("data.image_size", "(0, 4)"), ("task", "'x'"),
                               ("optim.lr", "'fast'"), ("batch_size", "4.5")])
    text = ("from configs import default\n\ndef get_config(arg=None):\n"
            "  c = default.get_config(arg or 'runlocal')\n  c.unlock()\n"
            f"  c.{field} = {value}\n  return c\n")
  elif defect == 14:  # a mistake in the user's own code
    text = ("def get_config(arg=None):\n  import ml_collections\n"
            "  c = ml_collections.ConfigDict()\n  return c.missing_field\n")
  elif defect == 15:  # a path with a colon, or an empty one
    return rng.choice(["", ":", ":runlocal", folder + ":x", "configs/nope.py"])
  elif defect == 16:  # unreadable: a link loop
    os.symlink(path, path)
    return path
  else:  # a bad switch of a good file
    text = GOOD_FILE
    return _write(path, text) + ":" + rng.choice(["heads=x", "k=abc", "k=-1",
                                                  "runlocal,batch=4", "k=0"])
  return _write(path, text)


def _write(path, text) -> str:
  with open(path, "w") as f:
    f.write(text)
  return path


def test_config_files(fuzz, tmp_path, tfds_dir):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root = tmp_path / str(i)
    root.mkdir()
    spec = _config_file(rng, str(root))
    workdir = str(root / "run")
    tool = rng.choice(["train", "train", "sweep", "aot"])
    argv = ["--config", spec, f"--config.data.data_dir={tfds_dir}"]
    if tool == "aot":  # never compiles: a topology no TPU has
      argv += ["--topology=v9z:2x2"]
    else:  # the data of runlocal, whatever the file: the session's dataset
      argv += [f"--workdir={workdir}", "--config.data.parts.train_size=256",
               "--config.data.parts.validation_size=64",
               "--config.data.parts.test_size=64"]
    if tool == "sweep":
      argv += ["--trials=1"]
    # Defects that leave a good config run (stubbed): their outputs exist.
    fuzz.run(i, tool, argv, str(root), outputs=[workdir],
             check_ok=(_config_json_ok(workdir) if tool == "train"
                       else (lambda w=workdir: None if os.path.isfile(
                           os.path.join(w, "best.json")) else "no best.json")))


# -- image trees -------------------------------------------------------------------
MODES = ["L", "LA", "P", "PT", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "1"]
FORMATS = {"L": ["png", "jpg", "bmp", "gif", "tif"], "LA": ["png", "tif"],
           "P": ["png", "gif", "bmp"], "PT": ["png", "gif"],
           "RGB": ["png", "jpg", "bmp", "tif", "webp", "ppm"],
           "RGBA": ["png", "tif", "webp"], "CMYK": ["jpg", "tif"],
           "I;16": ["png", "tif"], "I": ["tif", "png"], "F": ["tif"],
           "1": ["png", "bmp", "tif"]}
NAMES = ["a", "b c", "ünï", "x,y", 'q"uote', "new\nline", "tab\tname", "-x",
         "four\nline\nbreak\nname", "cr\rlf",
         "#h", "a" * 150, "%s", "semi;colon", "ä" * 40]
BAD_BYTES = [b"\xff\xfe", b"caf\xe9", b"\x80abc"]


def _name(rng) -> str:
  if rng.random() < 0.15:
    return os.fsdecode(rng.choice(BAD_BYTES) + str(rng.randrange(99)).encode())
  return rng.choice(NAMES) + str(rng.randrange(999))


def _pixels(rng, mode, w, h):
  a = np.random.default_rng(rng.randrange(2**32))
  if mode == "PT":
    img = Image.fromarray(a.integers(0, 255, (h, w), np.uint8), "L").convert("P")
    img.info["transparency"] = 0
    return img
  if mode == "I;16":
    return Image.fromarray(a.integers(0, 65535, (h, w), np.uint16), "I;16")
  if mode == "I":
    return Image.fromarray(a.integers(-2**20, 2**20, (h, w), np.int32), "I")
  if mode == "F":
    values = a.random((h, w), np.float32) * rng.choice([1, 1000, -5])
    if rng.random() < 0.2:
      values[0, 0] = rng.choice([np.nan, np.inf])
    return Image.fromarray(values, "F")
  rgb = Image.fromarray(a.integers(0, 255, (h, w, 3), np.uint8), "RGB")
  return rgb.convert(mode)


def _image_file(rng, folder) -> None:
  """One file: an image of a random mode and size, or a broken one."""
  mode = rng.choice(MODES)
  fmt = rng.choice(FORMATS[mode])
  ext = rng.choice([fmt, fmt.upper()]) if rng.random() < 0.9 else rng.choice(
      ["jpeg", "txt", "PNG", "tiff", "png"])
  path = os.path.join(folder, f"{_name(rng)}.{ext}")
  kind = rng.random()
  side = lambda: rng.choice([1, 1, 2, 3, 17, 40, 48, rng.randint(1, 64)])
  w, h = side(), side()
  if rng.random() < 0.1:
    w, h = 49, 48  # just over the limit
  try:
    if kind < 0.08:
      with open(path, "wb"):
        pass  # empty
      return
    if kind < 0.14:
      with open(path, "wb") as f:
        f.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))
      return
    _pixels(rng, mode, w, h).save(path, format={"jpg": "JPEG", "tif": "TIFF"}
                                  .get(fmt, fmt.upper()))
    if kind < 0.25:  # truncated
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.truncate(rng.randint(0, max(0, size - 1)))
  except (OSError, ValueError, KeyError):
    with contextlib.suppress(OSError):
      os.unlink(path)


def _tree(rng, folder, depth=0) -> None:
  """Images, sub-folders (some empty), links (to files, folders, nowhere,
  loops) under ``folder``."""
  os.makedirs(folder, exist_ok=True)
  for _ in range(rng.randint(0, 4)):
    _image_file(rng, folder)
  if depth < 2:
    for _ in range(rng.randint(0, 2)):
      _tree(rng, os.path.join(folder, _name(rng)), depth + 1)
  entries = os.listdir(folder)
  for _ in range(rng.randint(0, 1) if rng.random() < 0.3 else 0):
    target = rng.choice([
        "nowhere.png", ".", "..", rng.choice(entries) if entries else "x.png"])
    name = rng.choice(["link.png", "linkdir", ".hidden.png", "loop"])
    with contextlib.suppress(OSError):
      os.symlink(target, os.path.join(folder, name))
  if rng.random() < 0.1:  # a folder named like an image, and a hidden one
    os.makedirs(os.path.join(folder, "dir.png"), exist_ok=True)
  if rng.random() < 0.1:
    os.makedirs(os.path.join(folder, ".hidden"), exist_ok=True)
    _image_file(rng, os.path.join(folder, ".hidden"))


def test_train_images(fuzz, tmp_path):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root = tmp_path / str(i)
    data = root / "data"
    (data / "train").mkdir(parents=True)
    for _ in range(rng.randint(0, 4)):
      _tree(rng, str(data / "train" / _name(rng)), depth=1)
    workdir = str(root / "run")
    argv = ["--config", f"{FOLDER_CONFIG}:runlocal,dataset=folder,"
            f"data_dir={data},backbone=resnet_tiny",
            f"--workdir={workdir}", f"--config.batch_size={rng.choice([1, 2, 4])}",
            f"--config.eval_batch_size={rng.choice([1, 2, 4])}",
            f"--config.data.folder.max_pixels={MAX_PIXELS}",
            f"--config.data.folder.on_corrupt={rng.choice(['error', 'skip'])}",
            f"--config.data.folder.validation_percent="
            f"{rng.choice([0.0, 20.0, 50.0])}",
            "--config.mesh.num_devices=1"]
    fuzz.run(i, "train", argv, str(root), outputs=[workdir],
             check_ok=_config_json_ok(workdir))


def _predictions_ok(out, images, on_corrupt, overlays=False):
  def check():
    for name in ("predictions.csv", "maps.npz") + (("overlays",) * overlays):
      if not os.path.exists(os.path.join(out, name)):
        return f"exit 0 without {name}"
    with open(os.path.join(out, "predictions.csv"), newline="") as f:
      rows = list(csv.reader(f))[1:]
    listed = {image_files.display_name(p)
              for p in image_files.list_images(images)}
    names = [r[0] for r in rows]
    if not rows or (on_corrupt == "error" and len(rows) != len(listed)):
      return f"{len(rows)} predictions of {len(listed)} images"
    if not set(names) <= listed:
      return f"unknown names in the CSV: {sorted(set(names) - listed)[:3]}"
    probs = [float(x) for r in rows for x in r[2::2]]
    if not all(math.isfinite(p) and 0 <= p <= 1 for p in probs):
      return "probabilities out of [0, 1]"
    drawn = sum(len(f) for _, _, f in os.walk(os.path.join(out, "overlays")))
    if overlays and drawn != len(rows):
      return "not one overlay per prediction"
    leftovers = [n for n in os.listdir(os.path.dirname(out)) if "tmp" in n]
    return f"temporaries left: {leftovers}" if leftovers else None
  return check


@pytest.fixture(scope="module")
def artifact(finished_run, tmp_path_factory):
  """The finished run exported once (``predict --exported``)."""
  path = str(tmp_path_factory.mktemp("export") / "model.jaxexport")
  assert export.main([f"--workdir={finished_run.workdir}", f"--out={path}"]) == 0
  return path


def _images_arg(rng, root) -> str:
  """``--images``: mostly a random tree; sometimes a file, an empty folder,
  a link loop, or a folder with nothing an image's name."""
  images = os.path.join(root, "images")
  os.makedirs(root, exist_ok=True)
  kind = rng.random()
  if kind < 0.06:
    _write(images, "a file")
  elif kind < 0.1:
    os.makedirs(images)
  elif kind < 0.13:
    os.makedirs(root, exist_ok=True)
    os.symlink(images, images)
  elif kind < 0.16:
    os.makedirs(images)
    _write(os.path.join(images, "notes.txt"), "x")
    _write(os.path.join(images, ".hidden.png"), "x")
  else:
    _tree(rng, images)
  return images


def test_predict_images(fuzz, tmp_path, finished_run, artifact):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root = tmp_path / str(i)
    images = _images_arg(rng, str(root))
    out = str(root / "out")
    on_corrupt = rng.choice(["error", "skip"])
    model = (f"--exported={artifact}" if rng.random() < 0.25
             else f"--workdir={finished_run.workdir}")
    argv = [model, f"--images={images}", f"--out={out}",
            f"--batch={PREDICT_BATCH}", "--topk=2",
            f"--max_pixels={MAX_PIXELS}", f"--on_corrupt={on_corrupt}"]
    if rng.random() < 0.2:
      argv.append("--overlays")
    fuzz.run(i, "predict", argv, str(root), outputs=[out],
             check_ok=_predictions_ok(out, images, on_corrupt,
                                      "--overlays" in argv))


# -- output paths ------------------------------------------------------------------
@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
  """A read-only folder holding a file: a read-only tmpfs (root), else
  permissions; None where neither is possible."""
  folder = tmp_path_factory.mktemp("ro")
  (folder / "old.txt").write_text("kept")
  if os.geteuid() != 0:
    folder.chmod(0o555)
    yield str(folder)
    folder.chmod(0o755)
    return
  if not shutil.which("mount") or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
      capture_output=True).returncode != 0:
    yield None
    return
  (folder / "old.txt").write_text("kept")
  subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
  yield str(folder)
  subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _out_path(rng, root, read_only, tool) -> str:
  """A --out that is wrong in one way (or fine)."""
  kind = rng.randrange(10)
  if kind == 0:  # a file
    path = os.path.join(root, "file.txt")
    _write(path, "user data")
    return path
  if kind == 1 and read_only:
    return os.path.join(read_only, rng.choice(["", "sub", "sub/deeper"]))
  if kind == 2:  # under a file
    _write(os.path.join(root, "f"), "x")
    return os.path.join(root, "f", "out")
  if kind == 3:  # a folder of the user's
    os.makedirs(os.path.join(root, "mine"))
    _write(os.path.join(root, "mine", "thesis.tex"), "precious")
    return os.path.join(root, "mine")
  if kind == 4:  # another tool's results
    other = os.path.join(root, "other")
    os.makedirs(other)
    for name in rng.choice([["predictions.csv", "maps.npz"],
                            ["results.json", "results.md"], ["model.jaxexport"],
                            ["config.json", "checkpoints"]]):
      _write(os.path.join(other, name), "earlier")
    return other
  if kind == 5:  # a name too long, or one with odd bytes
    return os.path.join(root, rng.choice(["n" * 300, os.fsdecode(b"o\xffut")]))
  if kind == 6:  # a link loop, a dangling link
    link = os.path.join(root, "link")
    os.symlink(rng.choice([link, os.path.join(root, "nowhere", "x")]), link)
    return link
  if kind == 7:  # an empty or a missing folder: fine
    return os.path.join(root, rng.choice(["new", "a/b/c"]))
  if kind == 8:  # the input folder itself, or the run
    return os.path.join(root, "images")
  return os.path.join(root, "new.out")


def _case_with_two_images(tmp_path, i):
  """Case i's folder and, in it, ``images/`` holding two small PNGs."""
  root = tmp_path / str(i)
  images = root / "images"
  images.mkdir(parents=True)
  for j in range(2):
    Image.new("RGB", (8, 8), (j * 40, 10, 200)).save(images / f"{j}.png")
  return root, images


def test_outputs(fuzz, tmp_path, finished_run, read_only_dir, tfds_dir):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root, images = _case_with_two_images(tmp_path, i)
    tool = rng.choice(["predict", "predict", "export", "evaluate", "train"])
    out = _out_path(rng, str(root), read_only_dir, tool)
    if tool == "train":  # --workdir, stopped before the first step
      argv = [f"--config={DEFAULT}:runlocal", f"--workdir={out}",
              f"--config.data.data_dir={tfds_dir}"]
      check = _config_json_ok(out)
    elif tool == "predict":
      argv = [f"--workdir={finished_run.workdir}", f"--images={images}",
              f"--out={out}", f"--batch={PREDICT_BATCH}"]
      check = _predictions_ok(out, str(images), "error")
    elif tool == "export":
      argv = [f"--workdir={finished_run.workdir}", f"--out={out}"]
      check = lambda o=out: None if os.path.isfile(o) else "no artifact"
    else:
      # Evaluation runs only where --out is wrong: a bad --num_images keeps
      # a good --out from starting it.
      argv = [f"--workdir={finished_run.workdir}", f"--out={out}",
              "--split=test[:2]", "--figures=false", "--methods=own",
              "--batch_size=2"]
      if os.path.basename(out) in ("new", "c", "new.out"):
        argv.append("--num_images=0")
      check = lambda o=out: None if os.path.isfile(
          os.path.join(o, "results.json")) else "no results.json"
    fuzz.run(i, tool, argv, str(root), outputs=[out], check_ok=check)


# -- tool arguments ----------------------------------------------------------------
def _tool_args(rng, root, run, tfds) -> tuple[str, list[str], list[str], list]:
  """A tool and its arguments, some of them wrong; the outputs, and the
  wrong values drawn (none: the case may run)."""
  out = os.path.join(root, "out")
  bad = []

  def pick(options, good=()):
    value = rng.choice(options)
    if value not in good:
      bad.append(value)
    return value

  tool = rng.choice(["sweep", "evaluate", "export", "predict", "aot", "train"])
  extra = pick([[], [], [], ["--bogus=1"], ["stray"], ["--verbose=maybe"],
                ["--help=x"], ["--workdir="]], good=([],))
  if tool == "sweep":
    argv = [f"--config={DEFAULT}:runlocal", f"--workdir={out}",
            f"--config.data.data_dir={tfds}",
            "--trials=" + pick(["-2", "0", "1", "x", "2.5", "1"], good=("1",)),
            "--batch_sizes=" + pick(["0,-3", "8,x", "", "16", "32", ",", "3"],
                                    good=("16", "32", "")),
            "--sweep_seed=" + pick(["0", "-1", "z", "4294967296"], good=("0",))]
  elif tool == "evaluate":
    argv = [f"--workdir={run}", f"--out={out}", "--figures=false",
            "--methods=" + pick(["own,gradcamm", "x", "", ",", "own"],
                                good=("own",)),
            "--split=" + pick(["tset", "test[:x]", "train[", "test[:2]"],
                              good=("test[:2]",)),
            "--num_images=" + pick(["0", "-1", "a", "2"], good=("2",)),
            "--protocol=" + pick(["release", "bogus"], good=("release",)),
            "--checkpoint=" + pick(["auto", "worst"], good=("auto",))]
  elif tool == "export":
    argv = [f"--workdir={run}", f"--out={out}/m.jaxexport",
            "--platforms=" + pick(["gpu", "cpu,gpu", "tpu9", "CPU", "cpu"],
                                  good=("cpu",))]
  elif tool == "predict":
    argv = [f"--workdir={run}", f"--images={root}", f"--out={out}",
            "--batch=" + pick(["0", "-1", "x", "4"], good=("4",)),
            "--topk=" + pick(["0", "-3", "100000", "y", "2"], good=("2",)),
            "--max_pixels=" + pick(["0", "-5", "1e9", "9999"], good=("9999",)),
            "--on_corrupt=" + pick(["skip", "ignore", ""], good=("skip",))]
  elif tool == "aot":  # never compiles: every topology here is wrong
    argv = [f"--config={DEFAULT}:runlocal",
            "--topology=" + pick(["v9z:2x2", "v5e:0x0", "v4", "x:y:z", "tpu"]),
            "--steps=" + pick(["train", "bogus", ""], good=("train",)),
            "--fit_step=" + pick(["0", "-4", "4"], good=("4",))]
  else:
    argv = [f"--config={DEFAULT}:runlocal", f"--workdir={out}",
            f"--config.data.data_dir={tfds}",
            pick(["--num_processes=-1", "--allow_config_change=2",
                  "--process_id=-1", "--heartbeat_timeout_seconds=0",
                  "--heartbeat_timeout_seconds=x", "--config.seed=1=2",
                  "--config", "--config="])]
  rng.shuffle(argv)
  return tool, argv + extra, [out], bad  # last: a later flag would win


def test_tool_args(fuzz, tmp_path, finished_run, tfds_dir):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root = tmp_path / str(i)
    root.mkdir()
    tool, argv, outs, bad = _tool_args(rng, str(root),
                                       str(finished_run.workdir), tfds_dir)
    # A case with a wrong value must exit 2; one without may run.
    fuzz.run(i, tool, argv, str(root), outputs=outs,
             check_ok=lambda b=bad: f"ran although {b} is wrong" if b else None)


# -- runs and artifacts as inputs --------------------------------------------------
def _damaged_run(rng, root, run) -> str:
  """``--workdir``: a copy of the finished run with one defect, or a path
  that is no run at all."""
  workdir = os.path.join(root, "run")
  kind = rng.randrange(12)
  if kind == 0:
    return os.path.join(root, "missing")
  if kind == 1:
    return _write(workdir, "a file")
  if kind == 2:
    os.makedirs(workdir)
    return workdir
  shutil.copytree(run, workdir, symlinks=True)
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs)
  if kind == 3:
    os.unlink(os.path.join(workdir, "config.json"))
  elif kind == 4:
    _write(os.path.join(workdir, "config.json"),
           rng.choice(["{", "[]", "null", '{"seed": 0}', "", '{"model": 3}']))
  elif kind == 5:
    _write(os.path.join(workdir, "class_names.json"),
           rng.choice(["{", "[]", "3", '["only one"]', ""]))
  elif kind == 6:  # one file of a checkpoint truncated
    path = rng.choice([f for f in files if "/best/" in f or "/checkpoints/" in f])
    with open(path, "r+b") as f:
      f.truncate(rng.randint(0, max(0, os.path.getsize(path) - 1)))
  elif kind == 7:  # bytes flipped
    path = rng.choice(files)
    data = bytearray(open(path, "rb").read())
    for _ in range(rng.randint(1, 8)):
      if data:
        data[rng.randrange(len(data))] ^= 0xFF
    with open(path, "wb") as f:
      f.write(data)
  elif kind == 8:
    shutil.rmtree(os.path.join(workdir, rng.choice(["best", "checkpoints"])))
  elif kind == 9:
    for name in ("best", "checkpoints"):
      shutil.rmtree(os.path.join(workdir, name))
  elif kind == 10:  # a checkpoint folder replaced by a file
    name = rng.choice(["best", "checkpoints"])
    shutil.rmtree(os.path.join(workdir, name))
    _write(os.path.join(workdir, name), "x")
  return workdir


def _damaged_artifact(rng, root, artifact) -> str:
  path = os.path.join(root, "model.jaxexport")
  kind = rng.randrange(5)
  if kind == 0:
    return _write(path, rng.choice(["", "not a model", "PK\x03\x04"]))
  if kind == 1:
    os.makedirs(path)
    return path
  shutil.copy(artifact, path)
  if kind == 2:
    with open(path, "r+b") as f:
      f.truncate(rng.randint(0, os.path.getsize(path) - 1))
  elif kind == 3:
    data = bytearray(open(path, "rb").read())
    data[rng.randrange(len(data))] ^= 0xFF
    with open(path, "wb") as f:
      f.write(data)
  return path


def test_run_inputs(fuzz, tmp_path, finished_run, artifact):
  for i in fuzz.indices():
    rng = fuzz.rng(i)
    root, images = _case_with_two_images(tmp_path, i)
    out = str(root / "out")
    tool = rng.choice(["predict", "predict", "export"])
    if tool == "predict" and rng.random() < 0.3:
      model = f"--exported={_damaged_artifact(rng, str(root), artifact)}"
    else:
      model = f"--workdir={_damaged_run(rng, str(root), finished_run.workdir)}"
    if tool == "predict":
      argv = [model, f"--images={images}", f"--out={out}",
              f"--batch={PREDICT_BATCH}"]
      check = _predictions_ok(out, str(images), "error")
    else:
      out = os.path.join(out, "m.jaxexport")
      argv = [model, f"--out={out}"]
      check = lambda o=out: None if os.path.isfile(o) else "no artifact"
    fuzz.run(i, tool, argv, str(root), outputs=[out], check_ok=check)
