"""Pretrained weights: torchvision equivalence, file formats, strictness, init_from.

The golden outputs in tests/golden come from the real torchvision models run on
the same random weights (``python -m brnpa_jax.tools.weights_golden``), and the
``.pth`` golden was written by PyTorch, so this test needs no PyTorch; only the
round trip through the installed PyTorch is skipped without it.
"""

import os
import pickle
import sys
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util

from brnpa_jax.models import torch_pickle, weights
from brnpa_jax.tools import convert_weights, pth_golden
from brnpa_jax.tools.weights_golden import (GOLDEN_ARCHS, golden_input,
                                            random_state_dict)
from brnpa_jax.runs import abstract_like
from brnpa_jax.train.trainer import Trainer, train_and_evaluate
from helpers import abstract_variables, weights_model
from configs import default

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


@pytest.fixture(scope="module")
def tiny_sd():
  return random_state_dict("resnet_tiny", num_classes=10, seed=1)


@pytest.mark.parametrize("arch", GOLDEN_ARCHS)
def test_equals_torchvision_forward(arch):
  """Features and logits of torchvision's model on the same weights, low and
  high resolution (strides differ, weights do not)."""
  golden = np.load(os.path.join(GOLDEN, f"{arch}.npz"))
  flat = weights.torch_to_flat(random_state_dict(arch))
  for res, key in (("low", "logits"), ("high", "logits_high")):
    model = weights_model(arch, res)
    variables = weights.load_pretrained(abstract_variables(model), flat)
    logits, aux = jax.jit(model.apply)(variables, golden_input())
    np.testing.assert_allclose(logits, golden[key], rtol=0, atol=1e-4)
    if res == "low":
      np.testing.assert_allclose(aux["features"], golden["features"], rtol=0,
                                 atol=1e-4)
    else:
      assert aux["features"].shape[1:3] == (8, 8)  # output stride 8 at 64 px


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_file_formats_round_trip(tmp_path, tiny_sd, capsys):
  ref = weights.torch_to_flat(tiny_sd)
  assert ref["params/backbone/conv1/kernel"].shape == (7, 7, 3, 8)  # HWIO
  np.testing.assert_array_equal(ref["params/classifier/kernel"],
                                tiny_sd["fc.weight"].T)
  np.savez(tmp_path / "tv.npz", **tiny_sd)
  _assert_same(weights.read_checkpoint(str(tmp_path / "tv.npz")), ref)
  safetensors = pytest.importorskip("safetensors.numpy")
  safetensors.save_file(tiny_sd, str(tmp_path / "tv.safetensors"))
  _assert_same(weights.read_checkpoint(str(tmp_path / "tv.safetensors")), ref)
  # The converted file holds our names and loads to the same arrays.
  assert convert_weights.main([f"--weights={tmp_path / 'tv.safetensors'}",
                               f"--out={tmp_path / 'ours.npz'}"]) == 0
  assert "resnet_tiny" in capsys.readouterr().out
  with np.load(tmp_path / "ours.npz") as f:
    assert "batch_stats/backbone/layer2_0/downsample_bn/mean" in f.files
  _assert_same(weights.read_checkpoint(str(tmp_path / "ours.npz")), ref)


def test_pth_written_by_pytorch_reads_without_it(tmp_path, monkeypatch):
  """tests/golden/resnet_tiny.pth, a training checkpoint PyTorch wrote
  (wrapped, DataParallel's prefix, permuted views, a shared storage, a
  Parameter; ``python -m brnpa_jax.tools.pth_golden``), read and converted
  with PyTorch unimportable."""
  monkeypatch.setitem(sys.modules, "torch", None)
  path = os.path.join(GOLDEN, "resnet_tiny.pth")
  ref = weights.torch_to_flat(pth_golden.resnet_state_dict())
  _assert_same(weights.read_checkpoint(path), ref)
  convert_weights.convert(path, str(tmp_path / "o.npz"))
  _assert_same(weights.read_checkpoint(str(tmp_path / "o.npz")), ref)


def test_pth_round_trip(tmp_path, tiny_sd):
  """The installed PyTorch's own files, in both of its formats."""
  torch = pytest.importorskip("torch")
  tensors = {k: torch.from_numpy(v) for k, v in tiny_sd.items()}
  torch.save(tensors, tmp_path / "plain.pth")
  torch.save({"model": tensors}, tmp_path / "legacy.pt",
             _use_new_zipfile_serialization=False)
  ref = weights.torch_to_flat(tiny_sd)
  _assert_same(weights.read_checkpoint(str(tmp_path / "plain.pth")), ref)
  _assert_same(weights.read_checkpoint(str(tmp_path / "legacy.pt")), ref)


def test_pth_errors_are_clear(tmp_path, monkeypatch):
  """Only the legacy format needs PyTorch; a file of neither format and a
  pickle that names anything but tensors are refused."""
  (tmp_path / "legacy.pth").write_bytes(torch_pickle._LEGACY_MAGIC + b"...")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="legacy.*needs PyTorch.*convert_weights"):
    weights.read_checkpoint(str(tmp_path / "legacy.pth"))
  (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="not a PyTorch file"):
    weights.read_checkpoint(str(tmp_path / "w.pth"))
  with zipfile.ZipFile(tmp_path / "code.pth", "w") as z:
    z.writestr("code/data.pkl", pickle.dumps({"w": eval}))
  with pytest.raises(ValueError, match=r"builtins.eval is not allowed"):
    weights.read_checkpoint(str(tmp_path / "code.pth"))


def test_bad_paths_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No weights file"):
    weights.read_checkpoint(str(tmp_path / "nope.npz"))
  (tmp_path / "w.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match="Unknown weights format"):
    weights.read_checkpoint(str(tmp_path / "w.ckpt"))


def test_strict_loader_lists_every_problem(tiny_sd):
  sd = dict(tiny_sd)
  del sd["layer2.0.bn1.running_var"]
  sd["conv1.0.weight"] = np.zeros((8, 3, 3, 3), np.float32)  # timm deep stem
  sd["layer1.0.conv2.weight"] = np.zeros((8, 4, 3, 3), np.float32)
  target = abstract_variables(weights_model("resnet_tiny", num_classes=10))
  with pytest.raises(ValueError) as err:
    weights.load_pretrained(target, weights.torch_to_flat(sd))
  msg = str(err.value)
  assert "missing (1):" in msg
  assert "batch_stats/backbone/layer2_0/bn1/var [layer2.0.bn1.running_var]" in msg
  assert "unexpected (1):\n    conv1.0.weight" in msg
  assert "mis-shaped (1):" in msg
  assert ("params/backbone/layer1_0/conv2/kernel [layer1.0.conv2.weight]: "
          "checkpoint (3, 3, 4, 8), model (3, 3, 8, 8)") in msg


def test_classifier_can_be_skipped(tiny_sd):
  variables = abstract_variables(weights_model("resnet_tiny", num_classes=5), 32)
  flat = weights.torch_to_flat(tiny_sd)
  with pytest.raises(ValueError, match=r"(?s)mis-shaped.*classifier/kernel.*"
                     "skip_classifier=True"):
    weights.load_pretrained(variables, flat)
  loaded = weights.load_pretrained(variables, flat, skip_classifier=True)
  assert loaded["params"]["classifier"] is not None
  assert loaded["params"]["classifier"]["kernel"] is variables["params"][
      "classifier"]["kernel"]
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["bn1"]["var"],
                                tiny_sd["bn1.running_var"])
  no_fc = {k: v for k, v in flat.items() if "classifier" not in k}
  weights.load_pretrained(variables, no_fc, skip_classifier=True)
  with pytest.raises(ValueError, match="missing.*\n.*params/classifier/bias"):
    weights.load_pretrained(variables, no_fc)


def test_convert_rejects_unknown_architecture(tmp_path, tiny_sd):
  sd = {k: v for k, v in tiny_sd.items() if not k.startswith("layer4")}
  np.savez(tmp_path / "three_stages.npz", **sd)
  with pytest.raises(ValueError, match=r"No backbone .*\(basic blocks \(1, 1, 1\)"):
    convert_weights.convert(str(tmp_path / "three_stages.npz"),
                            str(tmp_path / "out.npz"))


def _backbone(params):
  return jax.tree.map(np.asarray, jax.device_get(params["backbone"]))


@pytest.mark.slow
def test_init_from_starts_a_fresh_run_not_a_resumed_one(tmp_path, tfds_dir, tiny_sd):
  """A run with lr 0 ends with exactly the loaded backbone (high resolution);
  resuming it with another init_from keeps its own weights."""
  files = {}
  for seed in (1, 2):
    np.savez(tmp_path / f"tv{seed}.npz", **random_state_dict(
        "resnet_tiny", num_classes=10, seed=seed))
    files[seed] = str(tmp_path / f"ours{seed}.npz")
    convert_weights.convert(str(tmp_path / f"tv{seed}.npz"), files[seed])

  def config(init_from):
    c = default.get_config("runlocal,epochs=1,head=gap")
    c.unlock()
    c.data.data_dir = str(tfds_dir)
    c.mesh.num_devices = 1
    c.data.parts.train_size, c.data.parts.validation_size = 64, 32
    c.data.parts.test_size, c.num_overlays = 32, 0
    c.optim.lr, c.optim.warmup_epochs = 0.0, 0.0
    c.init_from = init_from
    c.lock()
    return c

  workdir = str(tmp_path / "run")
  train_and_evaluate(config(files[1]), workdir)
  expected = weights.read_checkpoint(files[1])
  trainer = Trainer(config(files[2]), workdir)
  try:
    abstract = abstract_like(trainer.state_shapes, trainer.state_sharding)
    best, _ = trainer.ckpt.restore_best(abstract)
    resumed, meta = trainer.restore_or_init()
  finally:
    trainer.close()
  assert meta["epoch"] == 1
  for state in (best, resumed):
    got = traverse_util.flatten_dict(_backbone(state.params), sep="/")
    assert sorted(got) == sorted(k.removeprefix("params/backbone/")
                                 for k in expected
                                 if k.startswith("params/backbone/"))
    for k, v in got.items():
      np.testing.assert_array_equal(v, expected[f"params/backbone/{k}"],
                                    err_msg=k)
