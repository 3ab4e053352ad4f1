"""Batch inference and export: a tiny saved run, an image folder, the artifact."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from brnpa_jax import artifact, export, predict
from brnpa_jax.data.normalization import IMAGENET_STD, normalize
from brnpa_jax.errors import ConfigError
from brnpa_jax.models import build_model
from brnpa_jax.runs import (Checkpointer, RunError, Workdir, load_run,
                            restore_variables)
from brnpa_jax.train.optim import make_optimizer
from brnpa_jax.train.state import create_state
from configs import default
from helpers import FAST_PRNG, xla_flags

pytestmark = pytest.mark.slow  # trains or compiles end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
NUM_IMAGES = 7
STEP = 12
# Predictions run with batch 3 wherever the batch size is not what a test is
# about: the model compiles for few shapes.


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A random tiny model saved the way the trainer saves, plus its config."""
  config = default.get_config("runlocal")
  with config.unlocked():
    config.data.image_size = SIZE
  model = build_model(config.model, config.data.parts.num_classes, config.dtype)
  tx, _ = make_optimizer(config.optim, steps_per_epoch=4, num_epochs=1)
  state = jax.jit(lambda rng: create_state(model, tx, rng, (1, SIZE, SIZE, 3)))(
      jax.random.key(0, impl=FAST_PRNG))
  # Noise on every parameter: outputs that differ per image (runlocal starts
  # the residual branches at zero).
  rng = np.random.default_rng(1)
  state = state.replace(step=state.step + STEP, params=jax.tree.map(
      lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), state.params))
  workdir = str(tmp_path_factory.mktemp("run"))
  ckpt = Checkpointer(workdir)
  ckpt.save(STEP, state, {"best_val_accuracy": 0.5, "best_step": STEP, "epoch": 1},
            best=True)
  ckpt.wait_until_finished()
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  return workdir, config, state


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Seven images of several sizes and formats, one in a subfolder."""
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  os.makedirs(folder / "sub")
  sizes = [(40, 50), (64, 64), (30, 80), (90, 36), (33, 33), (50, 40), (128, 96)]
  for i, (h, w) in enumerate(sizes):
    name = f"sub/img{i}.jpg" if i == 3 else f"img{i}.{'png' if i % 2 else 'jpg'}"
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
  (folder / "notes.txt").write_text("not an image")
  return str(folder)


@pytest.fixture(scope="module")
def predictions(saved_run, image_folder, tmp_path_factory):
  """The model run with batch 3 (last batch padded) through the CLI, and batch 8."""
  workdir, _, _ = saved_run
  out3 = str(tmp_path_factory.mktemp("out3"))
  p3 = predict.run_predict(images=image_folder, out=out3, workdir=workdir,
                           batch=3, topk=4)
  assert predict.main(["--workdir", workdir, "--images", image_folder, "--out",
                       out3, "--batch", "3", "--topk", "4"]) == 0
  out8 = str(tmp_path_factory.mktemp("out8"))
  p8 = predict.run_predict(images=image_folder, out=out8, workdir=workdir,
                           batch=8, overlays=True)
  return p3, out3, p8, out8


def test_restores_the_best_state(saved_run):
  workdir, config, state = saved_run
  run = load_run(workdir)
  assert (run.step, run.checkpoint, run.num_classes) == (STEP, "best", 10)
  for a, b in zip(jax.tree.leaves(run.variables["params"]),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  assert load_run(workdir, checkpoint="latest").checkpoint == "latest"
  with pytest.raises(RunError, match="not a training workdir"):
    load_run(os.path.dirname(workdir))
  with pytest.raises(FileNotFoundError, match="train first"):
    restore_variables(os.path.dirname(workdir))


def test_folder_predictions_files_and_batch_invariance(predictions, image_folder):
  p3, out3, p8, _ = predictions
  expected = sorted(["img0.jpg", "img1.png", "img2.jpg", "sub/img3.jpg",
                     "img4.jpg", "img5.png", "img6.jpg"])
  assert p3.files == p8.files == expected
  for k in predict.OUTPUT_KEYS:
    np.testing.assert_allclose(p3.outputs[k], p8.outputs[k], atol=1e-5, rtol=1e-5)
  probs = p3.outputs["probs"]
  assert probs.shape == (NUM_IMAGES, 10)
  np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  assert p3.outputs["maps"].shape == (NUM_IMAGES, 3, 4, 4)
  assert p3.outputs["norms"].shape == (NUM_IMAGES, 4, 4)
  assert len({tuple(p.round(4)) for p in probs}) == NUM_IMAGES  # per-image outputs
  with open(os.path.join(out3, "predictions.csv")) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["file", "class_1", "prob_1", "class_2", "prob_2", "class_3",
                     "prob_3", "class_4", "prob_4"]
  assert [r[0] for r in rows[1:]] == expected
  for row, p in zip(rows[1:], probs):
    top = np.argsort(-p, kind="stable")[:4]
    assert [int(c) for c in row[1::2]] == list(top)
    np.testing.assert_allclose([float(q) for q in row[2::2]], p[top], atol=1e-6)
  with np.load(os.path.join(out3, "maps.npz")) as z:
    assert list(z["files"]) == expected
    np.testing.assert_array_equal(z["maps"], p3.outputs["maps"])
    np.testing.assert_array_equal(z["norms"], p3.outputs["norms"])
    assert z["topk_classes"].shape == (NUM_IMAGES, 4)
  # The same preprocessing as the evaluation pipeline, then the model.
  names, images, _ = next(predict.folder_batches(image_folder, SIZE, 0.875, 8))
  from brnpa_jax.data.transforms import eval_transform
  with Image.open(os.path.join(image_folder, names[2])) as im:
    direct = eval_transform(np.asarray(im), {}, size=SIZE)[0].numpy()
  np.testing.assert_allclose(images[2], direct, atol=1e-6)
  assert np.all(images[NUM_IMAGES:] == 0)  # padding


def test_predictions_are_the_models_softmax(saved_run, predictions, image_folder):
  """Independently of make_infer_fn, which predict and export share: the
  saved model applied to the preprocessed images, softmax of its logits."""
  _, config, state = saved_run
  p3, _, _, _ = predictions
  names, images, _ = next(predict.folder_batches(image_folder, SIZE, 0.875, 8))
  assert names == p3.files
  model = build_model(config.model, 10, config.dtype)
  logits, aux = jax.jit(lambda x: model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, x,
      train=False))(images)
  np.testing.assert_allclose(p3.outputs["probs"],
                             jax.nn.softmax(logits[:NUM_IMAGES]), atol=1e-6)
  np.testing.assert_allclose(p3.outputs["maps"], aux["maps"][:NUM_IMAGES],
                             atol=1e-6)
  np.testing.assert_allclose(p3.outputs["norms"], aux["norms"][:NUM_IMAGES],
                             rtol=1e-6)


def test_overlays_are_pngs(predictions):
  _, out3, p8, out8 = predictions
  assert not os.path.exists(os.path.join(out3, "overlays"))
  for name in p8.files:
    path = predict.overlay_path(out8, name)
    assert path.endswith(name.replace(".", "_") + ".png")
    with Image.open(path) as im:
      assert im.format == "PNG"
      assert im.size == (round(1.9 * 5 * 110), round((1.9 + 0.3) * 110))


@pytest.fixture(scope="module")
def exported(saved_run, tmp_path_factory):
  """The saved run exported through the CLI (exported once per module)."""
  workdir, _, _ = saved_run
  path = str(tmp_path_factory.mktemp("export") / "m.jaxexport")
  assert export.main(["--workdir", workdir, "--out", path]) == 0
  return path


def test_exported_artifact_gives_identical_outputs(exported, image_folder,
                                                    predictions, tmp_path):
  p3 = predictions[0]
  path = exported
  px = predict.run_predict(images=image_folder, out=str(tmp_path / "outx"),
                           exported=path, batch=3)
  assert px.files == p3.files
  for k in predict.OUTPUT_KEYS:
    np.testing.assert_array_equal(px.outputs[k], p3.outputs[k])
  # Reloaded in a fresh interpreter that cannot import the model code or flax,
  # on two batch sizes other than the one above.
  inputs = tmp_path / "inputs.npz"
  _, images, _ = next(predict.folder_batches(image_folder, SIZE, 0.875, NUM_IMAGES))
  np.savez(inputs, images=images)
  script = textwrap.dedent(f"""
      import importlib.util, sys
      import numpy as np
      for name in ("flax", "brnpa_jax", "brnpa_jax.models", "optax"):
        sys.modules[name] = None  # any import of them fails
      spec = importlib.util.spec_from_file_location("artifact", {artifact.__file__!r})
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      model = mod.load_exported({path!r})
      images = np.load({str(inputs)!r})["images"]
      out = {{}}
      for b in (2, 5):
        res = model(images[:b])
        out.update({{f"{{k}}_{{b}}": np.asarray(v) for k, v in res.items()}})
      np.savez({str(tmp_path / "reloaded.npz")!r}, **out)
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  subprocess.run([sys.executable, "-c", script], check=True, env=env,
                 cwd=str(tmp_path), timeout=300)
  with np.load(tmp_path / "reloaded.npz") as z:
    for b in (2, 5):
      for k in predict.OUTPUT_KEYS:
        assert z[f"{k}_{b}"].shape[0] == b
        np.testing.assert_allclose(z[f"{k}_{b}"], p3.outputs[k][:b], atol=1e-5,
                                   rtol=1e-5)


def test_dataset_split_with_labels(saved_run, tmp_path, capsys):
  workdir, _, _ = saved_run
  with tfds.testing.mock_data(num_examples=7):
    preds = predict.run_predict(images="test", out=str(tmp_path), workdir=workdir,
                                batch=3, topk=2)
  assert len(preds.files) == 7 and preds.labels.shape == (7,)
  assert all(f.startswith("test:") for f in preds.files)
  with open(tmp_path / "predictions.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0][:3] == ["file", "label", "class_1"] and len(rows) == 8
  assert [int(r[1]) for r in rows[1:]] == preds.labels.tolist()
  accuracy = np.mean(preds.outputs["probs"].argmax(1) == preds.labels)
  assert f"top-1 accuracy {accuracy:.4f}" in capsys.readouterr().out
  with np.load(tmp_path / "maps.npz") as z:
    np.testing.assert_array_equal(z["labels"], preds.labels)


def test_bad_inputs(saved_run, tmp_path):
  workdir, _, _ = saved_run
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no image files"):
    predict.run_predict(images=str(tmp_path / "empty"), out=str(tmp_path / "o"),
                        workdir=workdir, verbose=False)
  with pytest.raises(ValueError, match="--workdir"):
    predict.run_predict(images=str(tmp_path), out=str(tmp_path / "o"))
  with pytest.raises(FileNotFoundError, match="brnpa_jax.export"):
    artifact.load_exported(str(tmp_path / "missing.jaxexport"))


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
  """Good images, a truncated PNG, a corrupt JPEG, and rgb.png beside rgb.jpg."""
  folder = tmp_path_factory.mktemp("messy")
  rng = np.random.default_rng(3)
  for name in ("a.png", "rgb.png", "rgb.jpg", "z.jpg"):
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(
        folder / name)
  good = (folder / "a.png").read_bytes()
  (folder / "truncated.png").write_bytes(good[:len(good) // 2])
  (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
  return folder


def test_undecodable_images_are_named_or_skipped(saved_run, messy_folder,
                                                 tmp_path, capsys):
  workdir, _, _ = saved_run
  with pytest.raises(ConfigError, match=r"cannot decode .*corrupt.jpg.*"
                     r"--on_corrupt=skip"):
    predict.run_predict(images=str(messy_folder), out=str(tmp_path / "e"),
                        workdir=workdir, verbose=False)
  preds = predict.run_predict(images=str(messy_folder), out=str(tmp_path / "s"),
                              workdir=workdir, batch=3, overlays=True,
                              on_corrupt="skip", verbose=False)
  assert preds.files == ["a.png", "rgb.jpg", "rgb.png", "z.jpg"]
  err = capsys.readouterr().err
  assert "skipped" in err and "corrupt.jpg" in err and "truncated.png" in err
  with open(tmp_path / "s" / "predictions.csv") as f:
    assert len(list(csv.reader(f))) == 1 + 4
  overlays = sorted(os.listdir(tmp_path / "s" / "overlays"))
  assert overlays == ["a_png.png", "rgb_jpg.png", "rgb_png.png", "z_jpg.png"]


def test_class_names_from_the_run(saved_run, image_folder, tmp_path):
  """A run that recorded its class names: CSV, maps.npz and the artifact
  name the classes."""
  workdir, _, _ = saved_run
  named = tmp_path / "named"
  shutil.copytree(workdir, named)
  names = [f"class_{c}" for c in "abcdefghij"]
  Workdir(str(named)).write_class_names(names)
  preds = predict.run_predict(images=image_folder, out=str(tmp_path / "o"),
                              workdir=str(named), batch=3, topk=2, verbose=False)
  with open(tmp_path / "o" / "predictions.csv") as f:
    rows = list(csv.reader(f))
  top = preds.outputs["probs"].argmax(1)
  assert [r[1] for r in rows[1:]] == [names[c] for c in top]
  with np.load(tmp_path / "o" / "maps.npz") as z:
    assert list(z["class_names"]) == names
    np.testing.assert_array_equal(z["topk_classes"][:, 0], top)
  path = export.export_run(str(named), str(tmp_path / "m.jaxexport"))
  model = artifact.load_exported(path)
  assert model.class_names == names
  assert model.meta["input_dtype"] == "float32"
  assert model.meta["normalization"]["std"] == list(IMAGENET_STD)


def test_artifact_refuses_unnormalised_input(exported):
  model = artifact.load_exported(exported)
  raw = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3), np.uint8)
  with pytest.raises(artifact.ArtifactError, match="normalise first"):
    model(raw)
  np.testing.assert_allclose(model.normalize(raw), normalize(raw), atol=1e-6)
  out = model(model.normalize(raw))
  assert out["probs"].shape == (2, 10)


def test_a_typo_in_images_is_not_read_as_a_split(saved_run, tmp_path):
  workdir, _, _ = saved_run
  with pytest.raises(ConfigError, match="neither a folder nor a split"):
    predict.run_predict(images="tset", out=str(tmp_path / "o"), workdir=workdir,
                        verbose=False)
  with pytest.raises(ConfigError, match="photos/: no such folder"):
    predict.run_predict(images="photos/", out=str(tmp_path / "o"),
                        workdir=workdir, verbose=False)


def _folder_outputs(out):
  """The bytes of a predict output folder: CSV, overlays, npz arrays."""
  files = {}
  for root, _, names in os.walk(out):
    for name in names:
      path = os.path.join(root, name)
      if name != "maps.npz":
        files[os.path.relpath(path, out)] = open(path, "rb").read()
  with np.load(os.path.join(out, "maps.npz")) as z:
    arrays = {k: z[k] for k in z.files}
  return files, arrays


def test_outputs_equal_the_serial_loop_byte_for_byte(saved_run, image_folder,
                                                     predictions, tmp_path):
  """The parallel pipeline on 8 devices writes what the serial loop that
  predict ran before (kept in the benchmark) wrote on one device: CSV and
  overlay bytes, every npz array; and on one device here too."""
  from benchmarks import predict as bench  # pylint: disable=g-import-not-at-top
  workdir, config, _ = saved_run
  _, _, p8, out8 = predictions
  assert jax.local_device_count() == 8
  old = list(bench.serial_batches(image_folder, SIZE, 0.875, 8))
  new = list(predict.folder_batches(image_folder, SIZE, 0.875, 8, workers=3))
  assert [b[0] for b in old] == [b[0] for b in new]
  np.testing.assert_array_equal(np.concatenate([b[1] for b in old]),
                                np.concatenate([b[1] for b in new]))
  run = load_run(workdir)
  files, outputs, images, _ = bench.serial_predict(iter(old), run.model,
                                                  run.variables, keep_images=True)
  serial = predict.Predictions(files, None, outputs, 0.0, 0.0, 0.0, images)
  bench.serial_write_outputs(str(tmp_path / "serial"), serial, 5)
  one = predict.run_predict(images=image_folder, out=str(tmp_path / "one"),
                            workdir=workdir, batch=8, overlays=True, workers=1,
                            devices=jax.local_devices()[:1], verbose=False)
  want_files, want_arrays = _folder_outputs(tmp_path / "serial")
  assert len(want_files) == 1 + NUM_IMAGES  # the CSV and an overlay each
  for out in (out8, tmp_path / "one"):
    got_files, got_arrays = _folder_outputs(out)
    assert got_files == want_files
    assert got_arrays.keys() == want_arrays.keys()
    for k, v in want_arrays.items():
      np.testing.assert_array_equal(got_arrays[k], v, err_msg=k)
  for k in predict.OUTPUT_KEYS:
    np.testing.assert_array_equal(one.outputs[k], p8.outputs[k])


def test_shard_splits_in_order():
  parts = [predict.shard(list(range(7)), i, 3) for i in range(3)]
  assert parts == [[0, 1, 2], [3, 4], [5, 6]]
  assert predict.shard([0], 1, 2) == []


def test_two_processes_write_what_one_process_writes(saved_run, image_folder,
                                                     predictions, tmp_path):
  """``--multiprocess``: two processes predict 4 and 3 of the files; process
  0 writes the same bytes as one process. (8 devices in each process, as in
  this one: XLA's float rounding on a CPU can depend on how many devices
  share the process's cores.)"""
  workdir = saved_run[0]
  out8 = predictions[3]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "two"
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "brnpa_jax.predict", "--workdir", workdir,
         "--images", image_folder, "--out", str(out), "--batch", "8",
         "--overlays", "--multiprocess", f"--coordinator_address=localhost:{port}",
         "--num_processes=2"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "on each of 8 device(s) x 2 process(es)" in logs[0]
  assert "images" not in logs[1]  # process 0 alone reports and writes
  got_files, got_arrays = _folder_outputs(out)
  want_files, want_arrays = _folder_outputs(out8)
  assert got_files == want_files
  for k, v in want_arrays.items():
    np.testing.assert_array_equal(got_arrays[k], v, err_msg=k)
