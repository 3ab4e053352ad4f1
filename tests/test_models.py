"""Backbones, heads and the classifier."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from brnpa_jax.models import BACKBONES, build_model, registry
from brnpa_jax.models.blocks import DropPath, drop_path_rates
from brnpa_jax.models.registry import family
from brnpa_jax.models.resnet12 import ResNet12
from brnpa_jax.models.vit import VisionTransformer
from helpers import FAST_PRNG

# Every ResNet; one full-size and the test preset of the other families (the
# rest share their code; tests/test_timm.py checks all of their layouts).
STRIDE_CASES = sorted(n for n in BACKBONES if n.startswith("resnet")) + [
    "convnext_tiny", "convnext_test", "vit_small_patch16_224", "vit_test"]


@pytest.mark.parametrize("name", STRIDE_CASES)
@pytest.mark.parametrize("res,stride", [("low", 32), ("high", 8)])
def test_output_stride(name, res, stride):
  cls = family(name)
  net = BACKBONES[name](**cls.resolutions[res])
  if cls is ResNet12:  # no stem: its first pool (2) stands for 4
    stride //= 2
  if cls is VisionTransformer:  # the patch grid; high: overlapping patches
    stride = net.patch_size // (1 if res == "low" else 2)
  assert net.output_stride == stride
  x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  feats, _ = jax.eval_shape(
      lambda x: net.init_with_output(jax.random.key(0), x), x)
  assert feats.shape == (1, 64 // stride, 96 // stride, net.num_features)


def test_torchvision_parameter_layout():
  net = BACKBONES["resnet50"]()
  variables = jax.eval_shape(net.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  params = variables["params"]
  assert sorted(k for k in params if k.startswith("layer")) == sorted(
      [f"layer1_{i}" for i in range(3)] + [f"layer2_{i}" for i in range(4)]
      + [f"layer3_{i}" for i in range(6)] + [f"layer4_{i}" for i in range(3)])
  block = params["layer2_0"]
  assert set(block) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                        "downsample_conv", "downsample_bn"}
  assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)  # HWIO of (128,128,3,3)
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
  n_params = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
  assert n_params == 23_508_032  # torchvision resnet50 minus its fc layer


def _model_cfg(**kw):
  base = dict(backbone="resnet_tiny", res="high", head="brnpa", num_maps=3,
              refine=True, init="norm", aux_heads=False, dropout=0.2,
              use_bias=True)
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("head,k_maps", [("brnpa", 3), ("bcnn", 3), ("gap", 1)])
def test_heads_return_logits_and_aux(head, k_maps):
  model = build_model(_model_cfg(head=head), num_classes=5)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  # Shapes, dtypes and the parameter tree only: traced, never compiled.
  (logits, aux), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  c = 64  # resnet_tiny: width 8 * 2**3
  assert aux["features"].shape == (2, 4, 4, c)
  # B-CNN's attention is all K + 1 maps it predicts (it pools with K).
  assert aux["maps"].shape == (2, k_maps + (head == "bcnn"), 4, 4)
  assert aux["norms"].shape == (2, 4, 4)
  assert aux["vectors"].shape == (2, k_maps, c)
  if head == "brnpa":
    assert set(variables["params"]) == {"backbone", "classifier"}  # no attention params
    assert variables["params"]["classifier"]["kernel"].shape == (3 * c, 5)
  if head == "bcnn":
    to_maps = variables["params"]["head"]["attention"]["to_maps"]
    assert set(to_maps) == {"kernel"}  # no bias, as in the release
    assert to_maps["kernel"].shape == (1, 1, c, 4)


@pytest.mark.slow
def test_aux_heads_see_stop_gradient_slices():
  model = build_model(_model_cfg(aux_heads=True, dropout=0.0), num_classes=4)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  @jax.jit  # one compiled program, not op-by-op dispatch
  def init_and_grad(x):
    variables = model.init(jax.random.key(0, impl=FAST_PRNG), x)

    def aux_loss(params):
      _, aux = model.apply(dict(variables, params=params), x)
      return sum(jnp.sum(v) for v in aux["aux_logits"].values()), aux

    grads, aux = jax.grad(aux_loss, has_aux=True)(variables["params"])
    return variables, aux, grads

  variables, aux, grads = init_and_grad(x)
  assert set(aux["aux_logits"]) == {"v12", "v23", "v1", "v2", "v3"}
  assert variables["params"]["aux_v12"]["kernel"].shape == (2 * 64, 4)
  assert variables["params"]["aux_v3"]["kernel"].shape == (64, 4)
  backbone_grad = sum(float(jnp.sum(jnp.abs(g))) for g in
                      jax.tree.leaves(grads["backbone"]))
  assert backbone_grad == 0.0  # aux heads do not train the backbone
  assert float(jnp.sum(jnp.abs(grads["aux_v1"]["kernel"]))) > 0


def test_unknown_names_are_errors():
  with pytest.raises(ValueError, match="valid"):
    build_model(_model_cfg(backbone="resnet19"), 3)
  with pytest.raises(ValueError, match="valid"):
    build_model(_model_cfg(head="cam"), 3)
  with pytest.raises(ValueError, match="aux_heads"):
    build_model(_model_cfg(head="gap", aux_heads=True), 3)
  with pytest.raises(ValueError, match=r"'vit_test' has no resolution "
                     r"'reid_high'; valid: \['high', 'low'\]"):
    build_model(_model_cfg(backbone="vit_test", res="reid_high"), 3)


def test_bfloat16_compute_keeps_float32_params():
  model = build_model(_model_cfg(), 3, dtype="bfloat16")
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  # Dtypes only: traced, never compiled (the ConvNeXt and ViT test below
  # runs a bfloat16 forward pass).
  (logits, aux), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert aux["features"].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and aux["maps"].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


@pytest.mark.parametrize("backbone,relu", [("resnet_tiny", False),
                                           ("resnet12", True)])
def test_brnpa_head_gets_nonnegative_features(backbone, relu):
  """ResNet-12 ends in a leaky ReLU: the head rectifies its features, so the
  operator works in its domain (maps >= 0 that sum to 1)."""
  cfg = _model_cfg(backbone=backbone, width=8)
  model = build_model(cfg, num_classes=3)
  assert model.head.relu_input == relu
  assert model.backbone.nonnegative_features == (not relu)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  (_, aux), _ = jax.jit(
      lambda x: model.init_with_output(jax.random.key(0, impl=FAST_PRNG), x))(x)
  if relu:
    assert float(jnp.min(aux["features"])) < 0  # leaky ReLU output
  maps = np.asarray(aux["maps"])
  assert maps.min() >= 0
  np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("backbone,grid,c", [("convnext_test", 4, 64),
                                             ("vit_test", 8, 32)])
def test_heads_and_bfloat16_on_convnext_and_vit(backbone, grid, c):
  """Every head sits on the other families' grids; BR-NPA rectifies their
  signed features; ConvNeXt normalises each pooled vector (timm's head.norm);
  bfloat16 computes with the same float32 parameters."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  for head, k in (("gap", 1), ("bcnn", 4)):  # B-CNN: K=3 maps and the K+1-th
    model = build_model(_model_cfg(backbone=backbone, width=8, head=head), 5)
    (logits, aux), _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x), x)
    assert logits.shape == (2, 5) and aux["maps"].shape == (2, k, grid, grid)
  model = build_model(_model_cfg(backbone=backbone, width=8), 5)
  assert model.head.relu_input and not model.backbone.nonnegative_features
  (_, aux), variables = jax.jit(lambda x: model.init_with_output(
      jax.random.key(0, impl=FAST_PRNG), x))(x)
  assert aux["features"].shape == (2, grid, grid, c)
  assert float(jnp.min(aux["features"])) < 0
  maps = np.asarray(aux["maps"])
  assert maps.min() >= 0
  np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  emb = np.asarray(aux["embedding"]).reshape(2, 3, c)
  if backbone == "convnext_test":
    scale = variables["params"]["head_norm"]["scale"]
    np.testing.assert_allclose(scale, 1.0)  # at init: a plain LayerNorm
    np.testing.assert_allclose(emb.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(emb.std(-1), 1.0, rtol=1e-2)
  else:
    assert "head_norm" not in variables["params"]
    np.testing.assert_allclose(emb, aux["vectors"], rtol=1e-6)

  bf16 = build_model(_model_cfg(backbone=backbone, width=8), 5, dtype="bfloat16")
  logits, aux = jax.jit(bf16.apply)(variables, x)
  assert aux["features"].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("backbone,patch,res,grid", [
    ("convnext_test", 2, "low", 4), ("convnext_test", 2, "high", 16),
    ("convnext_test", 1, "low", 8), ("vit_test", 4, "low", 16),
    ("vit_test", 4, "high", 32)])
def test_small_image_variants_keep_timm_names(backbone, patch, res, grid):
  """``patch_size`` (ConvNeXt's stem, a ViT's patches, timm's argument) sets
  the grid; every parameter keeps the preset's name, and only the stem or
  patch kernel and the position embeddings (stored for ``img_size``) change
  shape."""
  cfg = _model_cfg(backbone=backbone, width=8, res=res, patch_size=patch,
                   img_size=64)
  model = build_model(cfg, 5)
  assert model.backbone.output_stride == 64 // grid
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  init = lambda m: jax.eval_shape(
      lambda x: m.init_with_output(jax.random.key(0), x), x)
  (_, aux), variables = init(model)
  assert aux["features"].shape[1:3] == (grid, grid)
  _, preset = init(build_model(_model_cfg(backbone=backbone, width=8, res=res), 5))
  flat = traverse_util.flatten_dict(variables, sep="/")
  flat_preset = traverse_util.flatten_dict(preset, sep="/")
  assert set(flat) == set(flat_preset)
  changed = {k for k in flat if flat[k].shape != flat_preset[k].shape}
  if backbone == "convnext_test":
    assert changed == {"params/backbone/stem_0/kernel"}
    assert flat["params/backbone/stem_0/kernel"].shape == (patch, patch, 3, 8)
  else:
    assert changed == {"params/backbone/patch_embed/proj/kernel"} | (
        {"params/backbone/pos_embed"} if patch != 8 else set())
    assert flat["params/backbone/pos_embed"].shape == (1, 1 + (64 // patch) ** 2, 32)


def test_drop_path_drops_whole_examples_at_timms_rates():
  assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
  x = jnp.ones((64, 4, 4, 3))
  y = DropPath(0.5).apply({}, x, True, rngs={"dropout": jax.random.key(0)})
  per_example = np.asarray(y).reshape(64, -1)
  assert set(np.unique(per_example)) == {0.0, 2.0}  # kept ones scaled by 1/(1-p)
  assert (per_example.min(1) == per_example.max(1)).all()  # whole examples
  assert 16 < (per_example[:, 0] == 0).sum() < 48
  np.testing.assert_array_equal(DropPath(0.5).apply({}, x, False), x)


@pytest.mark.parametrize("backbone,res,grid", [
    ("convnext_test", "low", 2), ("vit_test", "low", 8), ("vit_test", "high", 16)])
def test_conv_stem_has_the_patch_stems_stride(backbone, res, grid):
  """``stem=conv``: 3x3 convs with BatchNorm at the stride of the patch stem
  they replace (one fewer stride-2 conv for a ViT's ``res=high``), then the
  family's 1x1 projection under timm's name."""
  model = build_model(_model_cfg(backbone=backbone, width=8, res=res,
                                 stem="conv"), 5)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  (_, aux), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert aux["features"].shape[1:3] == (grid, grid)
  params = variables["params"]["backbone"]
  if backbone == "convnext_test":  # 4 = 2 x 2: two convs
    stem = params["stem_conv"]
    assert params["stem_0"]["kernel"].shape == (1, 1, 8, 8)
  else:  # 8 = 2 x 2 x 2
    stem = params["patch_embed"]["stem"]
    assert params["patch_embed"]["proj"]["kernel"].shape == (1, 1, 32, 32)
  n = 2 if backbone == "convnext_test" else 3
  assert set(stem) == {f"{k}_{i}" for k in ("conv", "bn") for i in range(n)}
  assert set(variables["batch_stats"]["backbone"]) == set(
      ["stem_conv"] if backbone == "convnext_test" else ["patch_embed"])


@pytest.mark.parametrize("backbone,fields,size", [
    ("convnext_test", dict(patch_size=2, res="high"), (30, 45)),
    ("convnext_test", dict(stem="conv", res="low"), (95, 70)),
    ("vit_test", dict(patch_size=4, img_size=64, res="high"), (22, 13)),
    ("vit_test", dict(stem="conv", res="high"), (36, 21))])
def test_feature_grid_of_small_image_variants(backbone, fields, size):
  """``registry.feature_grid`` (no tracing) is the traced grid of every
  variant, odd sizes included (a conv stem rounds up where a patch floors)."""
  cfg = _model_cfg(backbone=backbone, width=8, **fields)
  model = build_model(cfg, 5)
  x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  (_, aux), _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert registry.feature_grid(cfg, size) == aux["features"].shape[1:3]
