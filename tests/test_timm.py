"""ConvNeXt and ViT against timm: layouts, golden outputs, weight import,
initialisation.

The golden outputs in tests/golden come from timm's models run on the same
random weights (``python -m brnpa_jax.tools.timm_golden``), timm's own
initialisation statistics (``python -m brnpa_jax.tools.timm_init_golden``)
and a ``.pth`` file PyTorch wrote, so this test needs neither PyTorch nor
timm.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from brnpa_jax.models import timm_names, weights
from brnpa_jax.tools import convert_weights, pth_golden, timm_init_golden
from brnpa_jax.tools.timm_golden import (CASES, TIMM_NAMES, golden_input,
                                         grid_step, random_state_dict,
                                         timm_shapes)
from helpers import FAST_PRNG, abstract_variables, weights_model

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
TOLERANCE = 1e-4  # max |ours - timm| / max |timm|, float32


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _torch_shape(flat, shape):
  if flat.endswith("/kernel") and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
  if flat.endswith("/kernel") and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


@pytest.fixture(scope="module")
def timm_layouts():
  with open(os.path.join(GOLDEN, "timm_layouts.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("arch", TIMM_NAMES)
def test_parameter_layout_is_timms(arch, timm_layouts):
  """Every variable of our model is one key of timm's model, with its shape
  (full-size architectures, checked without weights), and the random-weight
  generator writes exactly timm's keys."""
  timm_sd = {k: tuple(s) for k, s in timm_layouts[arch]}
  flat = traverse_util.flatten_dict(abstract_variables(weights_model(arch)), sep="/")
  family = timm_names.flat_family(flat)
  ours = {timm_names.flat_name_to_timm(family, k): _torch_shape(k, v.shape)
          for k, v in flat.items()}
  assert ours == timm_sd
  assert timm_shapes(arch) == timm_sd
  assert list(timm_shapes(arch)) == list(timm_sd)  # timm's order, too


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_timm_forward(case):
  """Features and logits of timm's model on the same weights, relative error
  <= 1e-4: low and high resolution ConvNeXt, ViT at its native size, at a
  larger input (resampled position embeddings) and with stride-8 patches."""
  c = CASES[case]
  golden = np.load(os.path.join(GOLDEN, f"timm_{case}.npz"))
  model = weights_model(c.arch, c.res)
  variables = weights.load_pretrained(
      abstract_variables(model), weights.torch_to_flat(random_state_dict(c.arch)))
  logits, aux = jax.jit(model.apply)(variables, golden_input(c))
  feats = np.asarray(aux["features"])
  assert feats.shape[1:3] == tuple(golden["features_grid_shape"])
  step = grid_step(feats.shape[1:3])
  assert _rel_err(feats[:, ::step, ::step], golden["features"]) <= TOLERANCE
  assert _rel_err(logits, golden["logits"]) <= TOLERANCE


def test_vit_base_weights_into_vit_small_list_misshaped_keys():
  # Zero-copy arrays: only shapes matter to the loader.
  vit_b = {k: np.broadcast_to(np.float32(0), s)
           for k, s in timm_shapes("vit_base_patch16_224").items()}
  target = abstract_variables(weights_model("vit_small_patch16_224"))
  with pytest.raises(ValueError) as err:
    weights.load_pretrained(target, weights.torch_to_flat(vit_b))
  msg = str(err.value)
  assert "missing" not in msg and "unexpected" not in msg
  n = len(timm_shapes("vit_small_patch16_224"))
  assert f"mis-shaped ({n - 1}):" in msg  # all but head.bias: 768 vs 384 wide
  assert ("params/backbone/blocks_0/attn/qkv/kernel [blocks.0.attn.qkv.weight]: "
          "checkpoint (768, 2304), model (384, 1152)") in msg
  assert "params/backbone/pos_embed [pos_embed]: checkpoint (1, 197, 768)" in msg
  assert ("checkpoint: ViT 12 blocks, width 768, 16-pixel patches, 197 position "
          "tokens, 1000 classes; model: ViT 12 blocks, width 384") in msg


def test_unknown_timm_keys_are_listed_under_their_names():
  sd = random_state_dict("convnext_test", num_classes=10)
  sd["norm_pre.weight"] = np.ones(64, np.float32)  # head_norm_first variant
  del sd["head.norm.bias"]
  with pytest.raises(ValueError) as err:
    weights.load_pretrained(abstract_variables(weights_model("convnext_test", num_classes=10)),
                            weights.torch_to_flat(sd))
  msg = str(err.value)
  assert "missing (1):\n    params/head_norm/bias [head.norm.bias]" in msg
  assert "unexpected (1):\n    norm_pre.weight" in msg


@pytest.mark.parametrize("arch", ["convnext_test", "vit_test"])
def test_convert_recognises_timm_checkpoints(tmp_path, arch, capsys):
  sd = random_state_dict(arch, num_classes=10, seed=3)
  safetensors = pytest.importorskip("safetensors.numpy")
  safetensors.save_file(sd, str(tmp_path / "timm.safetensors"))
  assert convert_weights.main([f"--weights={tmp_path / 'timm.safetensors'}",
                               f"--out={tmp_path / 'ours.npz'}"]) == 0
  assert f"{arch}:" in capsys.readouterr().out
  ref = weights.torch_to_flat(sd)
  got = weights.read_checkpoint(str(tmp_path / "ours.npz"))
  assert sorted(got) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  # What init_from does: the backbone (and ConvNeXt's head_norm) load into a
  # model of other classes at high resolution.
  loaded = weights.load_pretrained(abstract_variables(weights_model(arch, "high", 5)),
                                   str(tmp_path / "ours.npz"),
                                   skip_classifier=True)
  assert loaded["params"]["classifier"]["kernel"].shape[-1] == 5


def test_pth_of_timm_layout(monkeypatch):
  """A timm checkpoint (state_dict_ema) as PyTorch wrote it, read with
  PyTorch unimportable: tests/golden/vit_test_ema.pth, each tensor one value
  broadcast (stride 0), in float32, float16, bfloat16 and float64 in turn."""
  monkeypatch.setitem(sys.modules, "torch", None)
  got = weights.read_checkpoint(os.path.join(GOLDEN, "vit_test_ema.pth"))
  want = weights.torch_to_flat({
      k: np.full(shape, pth_golden.vit_value(i)[0], np.float32)
      for i, (k, shape) in enumerate(pth_golden.vit_shapes().items())})
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert got["params/backbone/patch_embed/proj/kernel"].shape == (8, 8, 3, 256)
  assert convert_weights.infer_arch(got) == "vit_test"


@pytest.fixture(scope="module")
def timm_init():
  with open(os.path.join(GOLDEN, "timm_init_stats.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("case", sorted(timm_init_golden.CASES))
def test_initialisation_is_timms(case, timm_init):
  """Every parameter of a fresh ConvNeXt / ViT (and its classifier) is drawn
  as timm draws it: the same standard deviation and mean (within 4.5 sampling
  standard errors of ours), constants equal, and uniform draws (the ViT's
  patch embedding) within timm's bounds; timm's statistics pooled over
  ``NUM_DRAWS`` of its own inits (``tools/timm_init_golden.py``)."""
  golden = timm_init["cases"][case]
  model = weights_model(golden["preset"], num_classes=timm_init["num_classes"])
  key = jax.random.key(0, impl=FAST_PRNG)
  flat = traverse_util.flatten_dict(
      jax.jit(model.init)(key, np.zeros((1, 64, 64, 3), np.float32)), sep="/")
  family = timm_names.flat_family(flat)
  assert {timm_names.flat_name_to_timm(family, k) for k in flat} == set(
      golden["params"])
  bad = []
  for flat_name, value in flat.items():
    ref = golden["params"][timm_names.flat_name_to_timm(family, flat_name)]
    x = np.asarray(value, np.float64)
    assert _torch_shape(flat_name, x.shape) == tuple(ref["shape"])
    if ref["std"] < 1e-3 * abs(ref["mean"]) or ref["std"] == 0:  # a constant
      ok = np.allclose(x, ref["mean"], rtol=1e-6, atol=0)
    else:
      err = 4.5 / np.sqrt(x.size)
      ok = (abs(x.std() - ref["std"]) <= err / np.sqrt(2) * ref["std"]
            and abs(x.mean() - ref["mean"]) <= err * ref["std"])
      if ref["max_abs"] < 2.5 * ref["std"]:  # uniform (a normal's reach more)
        ok &= 0.9 * ref["max_abs"] <= np.abs(x).max() <= ref["max_abs"] * 1.001
    if not ok:
      bad.append(f"{flat_name}: std {x.std():.4g} (timm {ref['std']:.4g}), "
                 f"mean {x.mean():.3g} ({ref['mean']:.3g}), max |x| "
                 f"{np.abs(x).max():.3g} ({ref['max_abs']:.3g})")
  assert not bad, "\n".join(bad)
