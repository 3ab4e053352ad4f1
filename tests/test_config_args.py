"""Config files and their arg strings: switches, typos, types."""

import os

import pytest

from brnpa_jax.config_args import parse_arg
from brnpa_jax.data import catalog
from configs import default


def test_default_config_switches():
  c = default.get_config("head=bcnn,backbone=resnet34,res=low,k=5,refine=false,"
                         "init=random,dtype=bfloat16,epochs=3")
  assert (c.model.head, c.model.backbone, c.model.res) == ("bcnn", "resnet34", "low")
  assert (c.model.num_maps, c.model.refine, c.model.init) == (5, False, "random")
  assert c.dtype == "bfloat16" and c.num_epochs == 3
  assert default.get_config("aux_heads").model.aux_heads is True


def test_unknown_switch_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown config arg 'heads'.*'head'"):
    default.get_config("heads=bcnn")
  with pytest.raises(ValueError, match="valid values"):
    default.get_config("res=medium")
  with pytest.raises(ValueError, match="true or false"):
    default.get_config("refine=maybe")


def test_config_is_locked_against_typos():
  c = default.get_config()
  with pytest.raises(AttributeError):
    c.model.num_map = 4  # noqa: the typo is the point


def test_parse_arg_types():
  out = parse_arg("a=3,b=0.5,c,d=x", {"a": 1, "b": 1.0, "c": False, "d": "y"})
  assert out == {"a": 3, "b": 0.5, "c": True, "d": "x"}


def test_data_dir_defaults_to_tfds_data_dir(monkeypatch, tmp_path):
  cfg = default.get_config()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert catalog.data_dir(cfg.data) == str(tmp_path)
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert catalog.data_dir(cfg.data) == os.path.expanduser("~/tensorflow_datasets")
  with cfg.unlocked():
    cfg.data.data_dir = str(tmp_path / "x")
  assert catalog.data_dir(cfg.data) == str(tmp_path / "x")
