"""User mistakes at the command line: one to three lines on stderr, exit
status 2, no traceback, and nothing written that the mistake did not need."""

import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import train
from brnpa_jax import cli, errors, export, predict, sweep
from brnpa_jax.data import image_folder
from brnpa_jax.explain import evaluate
from brnpa_jax.tools import aot, convert_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "configs", "default.py")
LOWRES = os.path.join(REPO, "configs", "cub_brnpa_lowres.py")


def _train(*argv):
  return cli.run(train.define_flags, train.main, argv=list(argv), prog="train.py")


def _expect_user_error(capsys, status, *needles):
  """Status 2, at most three lines on stderr holding every needle."""
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.strip()]
  assert status == 2, err
  assert len(lines) in (1, 2, 3), err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in err, err
  return err


def test_bad_switch_and_unknown_field(tmp_path, capsys):
  status = _train("--config", f"{DEFAULT}:heads=bcnn", f"--workdir={tmp_path}/a")
  _expect_user_error(capsys, status, "Unknown config arg 'heads'", "'head'")
  status = _train("--config", DEFAULT, "--config.optim.lrr=1",
                  f"--workdir={tmp_path}/b")
  _expect_user_error(capsys, status, "lrr")
  status = _train("--config", DEFAULT, f"--workdir={tmp_path}/c", "--epochz=3")
  _expect_user_error(capsys, status, "epochz")
  # Found by tests/test_fuzz_cli.py: these were accepted (and ignored).
  for flag in ("--num_processes=-1", "--process_id=-1",
               "--heartbeat_timeout_seconds=0"):
    status = _train("--config", DEFAULT, f"--workdir={tmp_path}/d", flag)
    _expect_user_error(capsys, status, flag.split("=")[0][2:])
  assert not os.listdir(tmp_path)  # no workdir was created


def test_override_inside_a_value(tmp_path, capsys):
  # Found by tests/test_fuzz_cli.py: a TypeError traceback from ml_collections.
  for arg, needle in (("--config.model.backbone.x=1", "model.backbone is"),
                      ("--config.optim.lr.y.z=2", "optim.lr is"),
                      ("--config.seed.a=2", "seed is")):
    status = _train("--config", DEFAULT, arg, f"--workdir={tmp_path}/run")
    _expect_user_error(capsys, status, needle, "not a section")
  assert not os.listdir(tmp_path)


def test_ctrl_c_while_the_config_loads(tmp_path, capsys):
  # Found by tests/test_fuzz_cli.py: a KeyboardInterrupt escaped cli.run.
  slow = tmp_path / "slow.py"
  slow.write_text("raise KeyboardInterrupt\n")
  status = _train("--config", str(slow), f"--workdir={tmp_path}/run")
  err = capsys.readouterr().err
  assert status == 130 and err.strip() == "train.py: interrupted", err
  assert not os.path.exists(tmp_path / "run")


def test_a_path_of_any_bytes_is_printed(capsys):
  # Found by tests/test_fuzz_cli.py: predict --out with a non-UTF-8 byte
  # wrote its outputs, then failed printing their paths (UTF-8 locales make
  # stdout strict).
  sys.stdout.reconfigure(errors="strict")  # as under LANG=C.UTF-8
  path = os.fsdecode(b"/data/o\xffut/predictions.csv")
  status = cli.run(lambda fv, argv: None, lambda fv: print("Wrote", path),
                   argv=[], prog="tool", start_jax=False)
  assert status == 0
  assert capsys.readouterr().out == "Wrote /data/o\\udcffut/predictions.csv\n"
  assert sys.stdout.errors == "strict"  # as it was


def test_predict_on_a_folder_of_unreadable_files_is_one_error(tmp_path,
                                                              capsys):
  # Found by tests/test_fuzz_cli.py: a warning per skipped file, then the
  # error (4 lines and more).
  for i in range(4):
    (tmp_path / f"{i}.png").write_bytes(b"not an image")
  with pytest.raises(errors.ConfigError, match=r"could be read: 4 skipped "
                     r"\(the first: .*0\.png"):
    list(predict.folder_batches(str(tmp_path), 8, 0.875, 2, "skip"))
  assert capsys.readouterr().err == ""
  Image.new("RGB", (8, 8)).save(tmp_path / "3.png")  # one readable: warnings
  assert len(list(predict.folder_batches(str(tmp_path), 8, 0.875, 2, "skip"))) == 1
  assert capsys.readouterr().err.count("Warning: skipped") == 3


def test_a_newline_in_a_file_name_keeps_the_message_on_its_lines(tmp_path,
                                                                  capsys):
  # Found by tests/test_fuzz_cli.py: names with newlines broke the one-line
  # messages of image folders (corrupt files, empty classes) into several.
  root = _folder(tmp_path / "data", ["cat", "a\nb\nc\nd"], 3)
  (root / "train" / "cat" / "x\ny\nz\nw.png").write_bytes(b"not an image")
  status = _train("--config", f"{LOWRES}:runlocal,dataset=folder,data_dir={root}",
                  f"--workdir={tmp_path}/run")
  _expect_user_error(capsys, status, "x\\ny\\nz\\nw.png")
  for f in (root / "train" / "a\nb\nc\nd").iterdir():
    f.write_bytes(b"")
  status = _train("--config", f"{LOWRES}:runlocal,dataset=folder,data_dir={root}",
                  "--config.data.folder.on_corrupt=skip",
                  f"--workdir={tmp_path}/run")
  _expect_user_error(capsys, status, "no readable image: a\\nb\\nc\\nd")
  status = cli.run(lambda fv, argv: None, lambda fv: open(
      tmp_path / "no\nsuch\nfile\nhere"), argv=[], prog="tool", start_jax=False)
  _expect_user_error(capsys, status, "no\\nsuch\\nfile\\nhere")
  assert not os.path.exists(tmp_path / "run")


def test_a_run_without_a_checkpoint_or_with_damaged_files(finished_run,
                                                          tmp_path, capsys):
  # Found by tests/test_fuzz_cli.py: tracebacks (FileNotFoundError with a
  # message, JSONDecodeError, AttributeError, zipfile.BadZipFile).
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (8, 8)).save(images / "a.png")
  out = str(tmp_path / "out")
  cases = {"no_checkpoint": ("best", "no checkpoint (auto)"),
           "bad_json": ("config.json", "config.json is damaged"),
           "not_a_config": ("config.json", "config.json is damaged"),
           "no_model": ("config.json", "does not describe a model"),
           "bad_names": ("class_names.json", "class_names.json is damaged")}
  for name, (damaged, needle) in cases.items():
    run = tmp_path / name
    shutil.copytree(finished_run.workdir, run)
    if name == "no_checkpoint":
      shutil.rmtree(run / "best")
      shutil.rmtree(run / "checkpoints")
    else:
      (run / damaged).write_text({"bad_json": "{", "not_a_config": "[]",
                                  "no_model": '{"model": 3}',
                                  "bad_names": '{"a": 1}'}[name])
    status = predict.main([f"--workdir={run}", f"--images={images}",
                           f"--out={out}"])
    _expect_user_error(capsys, status, needle)
    assert not os.path.exists(out)
  artifact = tmp_path / "m.jaxexport"
  assert export.main([f"--workdir={finished_run.workdir}",
                      f"--out={artifact}"]) == 0
  capsys.readouterr()
  data = artifact.read_bytes()
  artifact.write_bytes(data[:len(data) // 2])
  status = predict.main([f"--exported={artifact}", f"--images={images}",
                         f"--out={out}"])
  _expect_user_error(capsys, status, "m.jaxexport cannot be read",
                     "truncated or damaged")


def test_workdir_that_is_a_file(tmp_path, capsys):
  (tmp_path / "run").write_text("not a directory")
  status = _train("--config", f"{DEFAULT}:runlocal", f"--workdir={tmp_path}/run")
  _expect_user_error(capsys, status, "is a file, not a directory")


def test_unprepared_dataset_leaves_no_workdir(tmp_path, capsys):
  status = _train("--config", f"{LOWRES}:runlocal,data_dir={tmp_path}/tfds",
                  f"--workdir={tmp_path}/run")
  _expect_user_error(capsys, status, "not prepared",
                     "tfds build caltech_birds2011")
  assert not os.path.exists(tmp_path / "run")


def _folder(root, classes, per_class):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(root / "train" / c)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
          root / "train" / c / f"{i}.png")
  return root


def test_one_class_folder_and_tiny_dataset(tmp_path, capsys):
  one = _folder(tmp_path / "one", ["cat"], 12)
  status = _train("--config", f"{LOWRES}:runlocal,dataset=folder,data_dir={one}",
                  f"--workdir={tmp_path}/run1")
  _expect_user_error(capsys, status, "1 class", "two")
  few = _folder(tmp_path / "few", ["cat", "dog"], 3)
  status = _train("--config", f"{LOWRES}:runlocal,dataset=folder,data_dir={few}",
                  f"--workdir={tmp_path}/run2")
  _expect_user_error(capsys, status, "batch_size=16 is larger than the",
                     "--config.batch_size")
  assert not os.path.exists(tmp_path / "run1")
  assert not os.path.exists(tmp_path / "run2")


def test_folder_layout_mistakes_are_short(tmp_path, capsys):
  # Found by tests/test_fuzz_cli.py: the layout's help made these 8 lines.
  root = tmp_path / "data"
  cases = {"missing": "does not exist", "no_train": "No train/ folder",
           "no_classes": "has no class sub-folders", "no_images": "No images"}
  (root / "no_train").mkdir(parents=True)
  (root / "no_classes" / "train").mkdir(parents=True)
  (root / "no_images" / "train" / "cat").mkdir(parents=True)
  for name, needle in cases.items():
    status = _train("--config", f"{LOWRES}:runlocal,dataset=folder,"
                    f"data_dir={root / name}", f"--workdir={tmp_path}/{name}.run")
    _expect_user_error(capsys, status, needle, "train/<class>/<image>")
    assert not os.path.exists(tmp_path / f"{name}.run")


def test_predict_export_evaluate_name_what_is_missing(tmp_path, capsys):
  missing = str(tmp_path / "no_such_run")
  status = predict.main(["--workdir", missing, "--images", str(tmp_path),
                         "--out", str(tmp_path / "o")])
  _expect_user_error(capsys, status, "no_such_run does not exist")
  status = predict.main(["--workdir", missing, "--images", "phtos/",
                         "--out", str(tmp_path / "o")])
  _expect_user_error(capsys, status, "phtos/: no such folder")
  status = predict.main(["--images", str(tmp_path), "--out", str(tmp_path / "o")])
  _expect_user_error(capsys, status, "--workdir", "--exported")
  status = predict.main(["--exported", str(tmp_path / "m.jaxexport"),
                         "--images", str(tmp_path), "--out", str(tmp_path / "o")])
  _expect_user_error(capsys, status, "no exported model")
  status = export.main(["--workdir", missing, "--out", str(tmp_path / "m")])
  _expect_user_error(capsys, status, "does not exist")
  status = evaluate.main(["--workdir", missing, "--out", str(tmp_path / "e")])
  _expect_user_error(capsys, status, "does not exist")
  status = evaluate.main(["--workdir", missing])
  _expect_user_error(capsys, status, "--out")
  status = sweep.main(["--config", DEFAULT, "--workdir", str(tmp_path / "s"),
                       "--batch_sizes=8,x"])
  _expect_user_error(capsys, status, "--batch_sizes")


def test_weight_conversion_cub_arrangement_and_aot_mistakes(tmp_path, capsys):
  status = convert_weights.main([f"--weights={tmp_path}/resnet50.pth",
                                 f"--out={tmp_path}/r.npz"])
  _expect_user_error(capsys, status, "resnet50.pth: no such file")
  status = convert_weights.main([f"--weights={tmp_path}/x.pth"])
  _expect_user_error(capsys, status, "--out")
  (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
  status = convert_weights.main([f"--weights={tmp_path}/junk.safetensors",
                                 f"--out={tmp_path}/r.npz"])
  _expect_user_error(capsys, status, "junk.safetensors", "truncated, corrupt")
  assert not os.path.exists(tmp_path / "r.npz")
  status = image_folder.main([f"--cub_dir={tmp_path}/CUB_200_2011",
                              f"--out={tmp_path}/cub"])
  _expect_user_error(capsys, status, "CUB_200_2011: no such folder")
  status = aot.main(["--config", f"{DEFAULT}:runlocal", "--topology=v9z:2x2"])
  _expect_user_error(capsys, status, "v9z")


def test_verbose_shows_the_traceback(tmp_path, capsys):
  status = predict.main(["--workdir", str(tmp_path / "nope"), "--images",
                         str(tmp_path), "--out", str(tmp_path / "o"), "--verbose"])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" in err and "does not exist" in err
