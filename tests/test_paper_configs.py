"""The paper's configs: the recipe's values, their switches, runlocal."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brnpa_jax.models import build_model
from brnpa_jax.recipes import paper as common
from fake_tfds import mock_tfds
from helpers import FAST_PRNG

NAMES = ("cub_brnpa_lowres", "cub_brnpa_highres_distill", "cub_bcnn", "cub_cnn",
         "cub_ablation")
HEADS = {"cub_brnpa_lowres": ("brnpa", "low"),
         "cub_brnpa_highres_distill": ("brnpa", "high"),
         "cub_bcnn": ("bcnn", "low"), "cub_cnn": ("gap", "low"),
         "cub_ablation": ("brnpa", "high")}  # as the release runs its ablations


def get_config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", NAMES)
def test_paper_recipe(name):
  c = get_config(name)
  assert (c.model.head, c.model.res) == HEADS[name]
  assert (c.model.backbone, c.model.width, c.model.num_maps) == ("resnet50", 64, 3)
  assert (c.optim.name, c.optim.lr, c.optim.momentum) == ("sgd", 1e-3, 0.9)
  assert (c.optim.schedule, c.optim.step_every_epochs, c.optim.step_gamma) == (
      "step", 2, 0.9)
  assert (c.batch_size, c.num_epochs, c.data.image_size) == (12, 50, 448)
  assert (c.data.name, c.data.brightness, c.data.saturation) == (
      "caltech_birds2011", 0.126, 0.5)
  assert c.data.resize == "square"  # as the authors' release resizes
  assert c.data.eval_splits == ("validation", "test")
  assert c.task == ("distill" if "distill" in name else "classification")
  assert c.init_from == "" and c.early_stopping_patience == 10
  assert importlib.import_module(f"configs.{name}").__doc__.count("train.py") >= 1


@pytest.mark.parametrize("name", NAMES)
def test_common_switches_and_runlocal(name):
  c = get_config(name, "dataset=cars196,size=224,epochs=7,batch=16,"
                       "init_from=w/r50.npz,patience=0,dtype=bfloat16")
  assert (c.data.name, c.data.image_size, c.num_epochs) == ("cars196", 224, 7)
  assert (c.batch_size, c.init_from, c.early_stopping_patience) == (16, "w/r50.npz", 0)
  assert c.dtype == "bfloat16"
  f = get_config(name, "dataset=folder,data_dir=/data/cub")
  assert (f.data.name, f.data.data_dir) == ("folder", "/data/cub")
  assert f.data.folder.verify and f.data.folder.on_corrupt == "error"
  tiny = get_config(name, "runlocal")
  size = 64 if tiny.model.res == "low" or tiny.task == "distill" else 32
  assert (tiny.model.backbone, tiny.data.image_size, tiny.num_epochs) == (
      "resnet_tiny", size, 2)
  assert (tiny.model.head, tiny.model.res) == HEADS[name]
  # The model the trainer will build from it accepts every field.
  model = build_model(tiny.model, 5, tiny.dtype)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  assert "params" in shapes
  with pytest.raises(AttributeError):  # locked: a typo is an error
    tiny.num_epoch = 3


@pytest.mark.parametrize("name", NAMES)
def test_unknown_switches_are_errors(name):
  with pytest.raises(ValueError, match="Unknown config arg 'datset'.*'dataset'"):
    get_config(name, "datset=cars196")
  with pytest.raises(ValueError, match="valid values"):
    get_config(name, "dataset=cub")
  with pytest.raises(ValueError, match="valid values"):
    get_config(name, "size=512")


@pytest.mark.parametrize("name,switch", [
    ("cub_brnpa_lowres", "res=high"), ("cub_brnpa_highres_distill", "res=low"),
    ("cub_cnn", "k=5"), ("cub_bcnn", "variant=both"),
    ("cub_brnpa_lowres", "temperature=3")])
def test_switches_a_config_fixes_are_refused(name, switch):
  with pytest.raises(ValueError, match="Unknown config arg"):
    get_config(name, switch)


def test_folder_needs_its_directory():
  with pytest.raises(ValueError, match="data_dir"):
    get_config("cub_cnn", "dataset=folder")


def test_resolution_switch_where_free():
  assert get_config("cub_bcnn", "res=high").model.res == "high"
  assert get_config("cub_ablation", "res=high,k=5").model.num_maps == 5
  # The ablations run at high resolution without distillation, as the
  # authors' release runs them.
  assert get_config("cub_ablation").model.res == "high"
  assert get_config("cub_ablation").task == "classification"
  assert get_config("cub_ablation", "res=low").model.res == "low"


@pytest.mark.parametrize("variant,model", [
    ("random_vectors", dict(init="random", refine=True, aux_heads=False)),
    ("no_refine", dict(init="norm", refine=False, aux_heads=False)),
    ("both", dict(init="random", refine=False, aux_heads=False)),
    ("aux_heads", dict(init="norm", refine=True, aux_heads=True)),
])
def test_ablation_variants(variant, model):
  c = get_config("cub_ablation", f"variant={variant}")
  assert {k: c.model[k] for k in model} == model
  with pytest.raises(ValueError, match="valid values"):
    get_config("cub_ablation", "variant=random")


def test_distill_section():
  c = get_config("cub_brnpa_highres_distill")
  assert c.distill.teacher_workdir == "runs/cub_brnpa_lowres"
  assert (c.distill.temperature, c.distill.alpha) == (11.0, 0.55)
  d = get_config("cub_brnpa_highres_distill",
                 "dataset=stanford_dogs,temperature=16,alpha=0.4")
  assert d.distill.teacher_workdir == "runs/stanford_dogs_brnpa_lowres"
  assert (d.distill.temperature, d.distill.alpha) == (16.0, 0.4)
  t = get_config("cub_brnpa_highres_distill", "teacher=/tmp/t")
  assert t.distill.teacher_workdir == "/tmp/t"


def test_run_names():
  assert common.run_name("caltech_birds2011") == "cub"
  assert common.run_name("cars196") == "cars196"


@pytest.mark.slow
def test_lowres_then_distilled_highres_on_mocked_cub(tmp_path):
  """The paper's two runs in order, tiny: the low-resolution BR-NPA, then the
  high-resolution student distilled from its best checkpoint."""
  from brnpa_jax.train.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top
  low_dir, high_dir = str(tmp_path / "low"), str(tmp_path / "high")

  def tiny(name, arg):
    c = get_config(name, arg)
    # One device and no overlays: compiling for 8 fake devices and plotting
    # would double the test's time; the trainer's own tests cover both.
    c.mesh.num_devices, c.num_overlays = 1, 0
    return c
  with mock_tfds(16), jax.default_prng_impl(FAST_PRNG):
    low = train_and_evaluate(tiny("cub_brnpa_lowres", "runlocal,epochs=1"), low_dir)
    high = train_and_evaluate(tiny("cub_brnpa_highres_distill",
                                   f"runlocal,epochs=1,teacher={low_dir}"), high_dir)
  assert low["model"] == "resnet_tiny brnpa res=low K=3"
  assert high["model"] == "resnet_tiny brnpa res=high K=3"
  for summary in (low, high):
    assert 0.0 <= summary["validation_accuracy"] <= 1.0
    assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert high["task"] == "distill"
  teacher = json.load(open(tmp_path / "low" / "config.json"))
  assert (teacher["data"]["name"], teacher["model"]["res"]) == (
      "caltech_birds2011", "low")
  rows = [json.loads(l) for l in open(tmp_path / "high" / "metrics.jsonl")]
  train = [r for r in rows if "train_kl" in r]  # the student did distil
  assert train and all(np.isfinite(r["train_loss"]) and r["train_kl"] >= 0
                       for r in train)
  assert all(0 <= r["train_teacher_agreement"] <= 1 for r in train)
