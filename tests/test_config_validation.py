"""Config files, config values and tool arguments at the command line: a
mistake is one to three lines and exit status 2 before a tool's main runs or
anything is written; an explicit switch beats a preset; a failed start never
poisons a workdir; no training step applies non-finite weights."""

import functools
import glob
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train
from brnpa_jax import cli, config_check, export, predict, sweep, tasks
from brnpa_jax.config_file import load_config
from brnpa_jax.explain import evaluate
from brnpa_jax.models import registry
from brnpa_jax.runs import ConfigMismatchError, Workdir
from brnpa_jax.runs.workdir import config_dict
from brnpa_jax.tools import aot
from brnpa_jax.train import optim, state as state_lib, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(REPO, "configs", "*.py")) if not p.endswith("__init__.py"))


def _config(name, arg=""):
  """``configs/<name>.py:<arg>`` (fewshot_folder gets its required root)."""
  if name == "fewshot_folder" and "root=" not in arg:
    arg = ",".join(filter(None, [arg, "root=/data"]))
  return load_config(os.path.join(REPO, "configs", f"{name}.py:{arg}"))


def _expect_user_error(capsys, status, *needles):
  """Status 2, one to three lines on stderr holding every needle."""
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.strip()]
  assert status == 2, err
  assert 1 <= len(lines) <= 3, err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in err, err
  return err


def _never(fv):
  raise AssertionError("the tool's main ran despite the mistake")


def _train(*argv, main=train.main):
  return cli.run(train.define_flags, main, argv=list(argv), prog="train.py")


# -- config files ------------------------------------------------------------------
BAD_FILES = {  # name: (content, what the message names)
    "syntax": ("def get_config(arg=None):\n  return {'a': 1\n",
               ("line 2", "SyntaxError")),
    "raises_on_import": ("import os\n\nVALUE = 1 / 0\n",
                         ("line 3", "ZeroDivisionError")),
    "raises_in_get_config": ("def get_config(arg=None):\n  c = {}\n"
                             "  return c['batch']\n", ("line 3", "KeyError")),
    "no_get_config": ("CONFIG = {'batch_size': 8}\n", ("get_config",)),
    # Found by tests/test_fuzz_cli.py: SystemExit escaped the tool.
    "exits_on_import": ("import sys\n\nsys.exit(0)\n", ("line 3", "SystemExit")),
    "exits_in_get_config": ("import sys\n\ndef get_config(arg=None):\n"
                            "  sys.exit(3)\n", ("line 4", "SystemExit: 3")),
    "returns_a_list": ("def get_config(arg=None):\n  return [1, 2]\n",
                       ("list", "ConfigDict")),
    "returns_none": ("def get_config(arg=None):\n  x = 1\n", ("None",)),
    "lacks_fields": ("def get_config(arg=None):\n  return {'seed': 0}\n",
                     ("--config.dtype is missing", "22 more")),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_config_file_that_gives_no_config(case, tmp_path, capsys):
  content, needles = BAD_FILES[case]
  path = tmp_path / f"{case}.py"
  path.write_text(content)
  status = _train("--config", str(path), f"--workdir={tmp_path}/run",
                  main=_never)
  if case != "lacks_fields":  # a loaded config: the fields are named
    needles += (f"{case}.py",)
  _expect_user_error(capsys, status, *needles)
  assert not os.path.exists(tmp_path / "run")


def test_a_missing_config_file_in_every_tool(tmp_path, capsys):
  missing = str(tmp_path / "no_such_config.py")
  for run, needle in [
      (lambda: _train("--config", missing, f"--workdir={tmp_path}/run",
                      main=_never), "no such file"),
      (lambda: _train("--config", str(tmp_path), f"--workdir={tmp_path}/run",
                      main=_never), "is a directory"),
      (lambda: sweep.main(["--config", missing, f"--workdir={tmp_path}/s"]),
       "no such file"),
      (lambda: aot.main(["--config", f"{missing}:runlocal",
                         "--topology=v5e:2x2"]), "no such file")]:
    _expect_user_error(capsys, run(), str(tmp_path), needle)
  assert sorted(os.listdir(tmp_path)) == []


# -- config values ------------------------------------------------------------------
# (config:arg, overrides, what the message names); each is refused before
# the tool's main runs.
BAD_VALUES = [
    ("default.py:runlocal", ["--config.grad_accum_steps=3"],
     ["batch_size=32", "multiple of grad_accum_steps=3"]),
    ("default.py:runlocal", ["--config.model.dropout=1.0"], ["model.dropout"]),
    # Found by tests/test_fuzz_cli.py: an OverflowError deep in JAX.
    ("default.py:runlocal", ["--config.model.width=9223372036854775808"],
     ["model.width=9223372036854775808", "below 2**31"]),
    ("default.py:runlocal,width=9223372036854775808", [], ["model.width"]),
    ("default.py:runlocal", ["--config.optim.name=adamx"],
     ["optim.name='adamx'", "'adamw'"]),
    ("default.py:runlocal", ["--config.dtype=float16"], ["dtype", "bfloat16"]),
    ("default.py:runlocal", ["--config.data.resize_ratio=0"], ["resize_ratio"]),
    ("default.py:runlocal", ["--config.data.resize=crop"], ["short_side"]),
    ("default.py:runlocal", ["--config.data.process_split=all"], ["slice"]),
    ("default.py:runlocal", ["--config.label_smoothing=1.0"], ["label_smoothing"]),
    ("default.py:runlocal", ["--config.optim.b2=1.5"], ["optim.b2"]),
    ("default.py:runlocal", ["--config.optim.weight_decay=-1e-4"],
     ["weight_decay"]),
    ("default.py:runlocal", ["--config.optim.weight_decay=inf"], ["weight_decay"]),
    ("default.py:runlocal", ["--config.optim.warmup_epochs=-1"], ["warmup_epochs"]),
    ("default.py:runlocal", ["--config.optim.schedule=linear"], ["'cosine'"]),
    ("default.py:runlocal", ["--config.num_epochs=0"], ["num_epochs"]),
    ("default.py:runlocal", ["--config.eval_batch_size=-1"], ["eval_batch_size"]),
    ("default.py:runlocal", ["--config.log_every_steps=0"], ["log_every_steps"]),
    ("default.py:runlocal", ["--config.checkpoint_every_steps=0"],
     ["checkpoint_every_steps"]),
    ("default.py:runlocal", ["--config.max_to_keep=0"], ["max_to_keep"]),
    ("default.py:runlocal", ["--config.mesh.fsdp=0"], ["mesh.fsdp"]),
    ("default.py:runlocal", ["--config.task=segmentation"], ["'reid'"]),
    ("default.py:runlocal", ["--config.model.init=zeros"], ["model.init"]),
    ("default.py:runlocal", ["--config.data.name=imagenet"], ["'parts'"]),
    ("default.py:runlocal", ["--config.data.image_size=0"], ["image_size"]),
    ("default.py:runlocal", ["--config.data.parts.train_size=0"], ["train_size"]),
    ("default.py:runlocal", ["--config.data.parts.num_classes=50"],
     ["num_classes=50"]),
    ("default.py:runlocal", ["--config.data.train_split=tarin"], ["trainval"]),
    ("default.py:runlocal,backbone=vit_test", ["--config.model.res=reid_high"],
     ["model.res", "'high'"]),
    ("default.py:runlocal,head=gap,aux_heads", [], ["aux_heads"]),
    ("default.py:runlocal,backbone=convnext_tiny,stem=conv,patch=3", [],
     ["model.patch_size=3", "conv stem"]),
    ("default.py:runlocal,backbone=vit_test,drop_path=1.5", [],
     ["model.drop_path_rate=1.5"]),
    ("default.py:runlocal,backbone=convnext_tiny", ["--config.data.image_size=4"],
     ["image_size=(4, 4)", "0x0 feature grid"]),
    ("cub_brnpa_highres_distill.py:runlocal", ["--config.distill.alpha=1.5"],
     ["distill.alpha=1.5"]),
    ("cub_brnpa_highres_distill.py:runlocal", ["--config.distill.temperature=0"],
     ["distill.temperature"]),
    ("fewshot_cub.py:runlocal,phase=episodic", [], ["pretrain_workdir"]),
    ("fewshot_cub.py:runlocal,phase=episodic,pretrain_workdir=x",
     ["--config.batch_size=99"], ["batch_size=99", "episodes"]),
    ("fewshot_cub.py:runlocal", ["--config.fewshot.select_shots=3"],
     ["select_shots=3"]),
    ("fewshot_cub.py:runlocal", ["--config.fewshot.train_ways=0"], ["train_ways"]),
    ("fewshot_folder.py:runlocal", [], ["data.folder.root"]),
    ("cub_cnn.py:runlocal,dataset=folder,data_dir=/d",
     ["--config.data.folder.max_pixels=0"], ["max_pixels=0"]),
    ("cub_cnn.py:runlocal,dataset=folder,data_dir=/d",
     ["--config.data.folder.on_corrupt=ignore"], ["'skip'"]),
    ("reid_market1501.py:runlocal", ["--config.batch_size=60"], ["batch_size=60", "16 x 4"]),
    ("reid_market1501.py:runlocal", ["--config.data.erasing_p=2.0"], ["erasing_p"]),
    ("reid_market1501.py:runlocal", ["--config.grad_accum_steps=4"],
     ["images_per_id=4"]),
]


@pytest.mark.parametrize("spec,overrides,needles", BAD_VALUES,
                         ids=[f"{s}{o}" for s, o, _ in BAD_VALUES])
def test_a_value_out_of_range_is_refused_before_main(spec, overrides, needles,
                                                     tmp_path, capsys):
  status = _train("--config", os.path.join(REPO, "configs", spec), *overrides,
                  f"--workdir={tmp_path}/run", main=_never)
  _expect_user_error(capsys, status, *needles)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("spec,override,needles", [
    ("default.py:runlocal", "--config.batch_size=0", ["batch_size=0", ">= 1"]),
    ("default.py:runlocal", "--config.batch_size=-4", ["batch_size=-4"]),
    ("default.py:runlocal", "--config.optim.lr=nan", ["optim.lr=nan", "finite"]),
    ("default.py:runlocal", "--config.optim.lr=-1", ["optim.lr=-1.0"]),
    ("default.py:res=low,k=5", "--config.num_epochs=1",
     ["num_maps=5", "2x2 feature grid", "resnet18"]),
    ("cub_brnpa_lowres.py:runlocal", "--config.data.image_size=32",
     ["num_maps=3", "1x1 feature grid", "res=low"]),
])
def test_the_issue_examples_leave_no_workdir(spec, override, needles, tmp_path,
                                            tfds_dir, capsys):
  """With the real train.py: today's tracebacks (ZeroDivisionError, a
  TensorFlow error, NaN weights, the operator's trace-time error) and the
  workdir they left behind."""
  status = _train("--config", os.path.join(REPO, "configs", spec), override,
                  f"--config.data.data_dir={tfds_dir}",
                  "--config.mesh.num_devices=1", f"--workdir={tmp_path}/run")
  _expect_user_error(capsys, status, *needles)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_every_config_validates(name, arg):
  assert config_check.problems(_config(name, arg)) == []


def test_every_documented_config_command_validates():
  """Each ``--config 'configs/...'`` in the README, the docs and the
  docstrings (placeholders and the documented typo aside)."""
  specs = set()
  for path in ([os.path.join(REPO, "README.md")]
               + [p for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
                  if not p.endswith("reliability.md")]  # shows mistakes
               + glob.glob(os.path.join(REPO, "configs", "*.py"))
               + glob.glob(os.path.join(REPO, "brnpa_jax", "**", "*.py"),
                           recursive=True)):
    text = open(path, encoding="utf-8").read().replace("\\\n", " ")
    specs |= set(re.findall(r"--config[ =]+['\"]?(configs/\w+\.py(?::[^'\"\s`]*)?)",
                            text))
  specs = {s for s in specs if not re.search(r"\$|=[A-Z]+\b|heads=|/x\.py", s)}
  assert len(specs) > 40
  bad = {s: [config_check.message(p) for p in config_check.problems(
      load_config(os.path.join(REPO, s)))] for s in specs}
  assert not {s: m for s, m in bad.items() if m}


def test_names_agree_with_the_rooms_that_use_them():
  assert set(config_check.TASKS) == set(tasks.TASKS)
  assert optim.OPTIMIZERS == config_check.OPTIMIZERS
  config_check.validate(_config("default"))


def test_feature_grid_is_the_traced_one():
  """``registry.feature_grid`` (strides only) against ``jax.eval_shape`` of
  each backbone family, odd sizes included."""
  for backbone, res, size in [("resnet_tiny", "low", (33, 47)),
                              ("resnet_tiny", "high", (17, 9)),
                              ("resnet12", "low", (84, 40)),
                              ("convnext_test", "high", (30, 45)),
                              ("vit_test", "high", (36, 20))]:
    cfg = _config("default").model.copy_and_resolve_references()
    cfg.backbone, cfg.res, cfg.width = backbone, res, 8
    net = registry.BACKBONES[backbone](**registry.backbone_kwargs(cfg))
    out = jax.eval_shape(lambda: net.init_with_output(
        jax.random.key(0), jnp.zeros((1, *size, 3)))[0])
    assert registry.feature_grid(cfg, size) == out.shape[1:3], backbone


# -- explicit switches beat presets --------------------------------------------------
# (config, arg, field, value the switch asked for); runlocal alone sets
# another value (checked too).
EXPLICIT = [
    ("default", "runlocal,width=32", "model.width", 32),
    ("cub_brnpa_lowres", "runlocal,batch=4", "batch_size", 4),
    ("cub_brnpa_lowres", "runlocal,size=224", "data.image_size", 224),
    ("cub_bcnn", "runlocal,backbone=convnext_tiny", "model.backbone",
     "convnext_test"),
    ("cub_cnn", "runlocal,batch=8", "batch_size", 8),
    ("cub_ablation", "runlocal,size=224", "data.image_size", 224),
    ("cub_brnpa_highres_distill", "runlocal,batch=6", "batch_size", 6),
    ("fewshot_cub", "runlocal,width=16", "model.width", 16),
    ("fewshot_cub", "runlocal,backbone=resnet18", "model.backbone", "resnet18"),
    ("fewshot_omniglot", "runlocal,width=16", "model.width", 16),
    ("fewshot_folder", "runlocal,width=16", "model.width", 16),
    ("reid_market1501", "runlocal,backbone=convnext_tiny", "model.backbone",
     "convnext_test"),
    ("parts_compare", "runlocal,epochs=3", "num_epochs", 3),
]


@pytest.mark.parametrize("name,arg,path,value", EXPLICIT,
                         ids=[f"{n}:{a}" for n, a, _, _ in EXPLICIT])
def test_an_explicit_switch_beats_the_preset(name, arg, path, value):
  get = lambda c: functools.reduce(lambda node, key: node[key],
                                   path.split("."), c)
  assert get(_config(name, "runlocal")) != value  # the preset alone differs
  config = _config(name, arg)
  assert get(config) == value
  config_check.validate(config)


# -- workdirs -------------------------------------------------------------------------
def test_a_workdir_without_checkpoints_takes_the_new_config(tmp_path):
  wd = Workdir(str(tmp_path / "run"))
  stored = config_dict(_config("default", "runlocal"))
  stored["batch_size"] = -4  # what a failed start used to leave
  os.makedirs(wd.path)
  with open(wd.config_file, "w") as f:
    json.dump(stored, f)
  config = _config("default", "runlocal")
  changes = wd.check_config(config)  # no checkpoint: accepted, no flag needed
  assert changes == [("batch_size", -4, 32)]
  wd.write_config(config, changes)
  assert wd.read_config().batch_size == 32
  (record,) = [json.loads(l) for l in open(wd.file("config_history.jsonl"))]
  assert record["changes"] == [{"field": "batch_size", "stored": -4,
                                "requested": 32}]
  # Once a state is saved, a changed config is refused as before...
  os.makedirs(os.path.join(wd.checkpoints_dir, "4"))
  with pytest.raises(ConfigMismatchError, match="--allow_config_change"):
    wd.check_config(_config("default", "runlocal,width=4"))
  # ...and a finished run is never changed.
  with open(wd.summary_file, "w") as f:
    json.dump({}, f)
  with pytest.raises(ConfigMismatchError, match="finished run"):
    wd.check_config(_config("default", "runlocal,width=4"), allow_change=True)


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path, capsys):
  """A workdir holding only a failed start's config.json: the next command
  goes on to its own checks (here: its dataset is not prepared), not
  'batch_size: stored -4'."""
  run = tmp_path / "run"
  os.makedirs(run)
  stored = config_dict(_config("cub_brnpa_lowres", "runlocal"))
  stored["batch_size"] = -4
  (run / "config.json").write_text(json.dumps(stored))
  status = _train("--config", os.path.join(
      REPO, f"configs/cub_brnpa_lowres.py:runlocal,data_dir={tmp_path}/tfds"),
                  f"--workdir={run}")
  err = _expect_user_error(capsys, status, "not prepared")
  assert "stored" not in err
  assert sorted(os.listdir(run)) == ["config.json"]


# -- non-finite values ------------------------------------------------------------------
class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(2)(x), {}


def _loss(logits, aux, batch, context):
  del aux, context
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["label"]).mean()
  return loss, {"loss": loss}


@pytest.mark.parametrize("lr", [float("nan"), 0.1])
def test_a_step_whose_new_weights_are_not_finite_is_skipped(lr):
  """A finite loss and gradient, but lr=nan makes every new weight
  non-finite: the step keeps the old state and reports itself."""
  model, tx = _Tiny(), optax.sgd(lr, momentum=0.9)
  state = state_lib.create_state(model, tx, jax.random.key(0), (4, 2, 2, 3))
  step = jax.jit(steps.make_train_step(model, tx, _loss))
  batch = {"image": jnp.linspace(-1, 1, 48).reshape(4, 2, 2, 3),
           "label": jnp.array([0, 1, 0, 1])}
  new, metrics = step(state, batch, jax.random.key(1))
  leaves = jax.tree.leaves((new.params, new.batch_stats, new.opt_state))
  assert all(np.isfinite(x).all() for x in leaves)
  assert float(metrics["nonfinite"]) == (0.0 if lr == 0.1 else 1.0)
  same = jax.tree.map(np.array_equal, new.params, state.params)
  assert all(jax.tree.leaves(same)) == (lr != 0.1)
  assert int(new.step) == 1


def test_predict_warns_when_its_outputs_are_not_finite(capsys):
  images = np.zeros((2, 8, 8, 3), np.float32)
  outputs = {"probs": np.array([[0.5, 0.5], [np.nan, np.nan]], np.float32),
             "maps": np.ones((2, 1, 2, 2), np.float32),
             "norms": np.ones((2, 2, 2), np.float32)}
  preds = predict.predict(iter([(["a.png", "b.png"], images, None)]),
                          lambda _: lambda x: outputs)
  err = capsys.readouterr().err
  assert "1 of 2 inputs hold NaN or Inf" in err and len(err.splitlines()) == 1
  assert np.isnan(preds.outputs["probs"][1]).all()  # written as they are
  predict.predict(iter([(["a.png"], images[:1], None)]),
                  lambda _: lambda x: {k: v[:1] for k, v in outputs.items()})
  assert capsys.readouterr().err == ""


# -- tool arguments ----------------------------------------------------------------
@pytest.mark.parametrize("args,needles", [
    (["--methods", "own,gradcamm"], ["gradcamm", "gradcampp", "rise"]),
    (["--split", "tset"], ["tset", "validation", "test[:100]"]),
    (["--num_images=0"], ["--num_images"]),
    (["--batch_size=0"], ["--batch_size"]),
    (["--chunk_size=0"], ["--chunk_size"]),
    (["--steps=0"], ["--steps"]),
    (["--pixels_per_step=-1"], ["--pixels_per_step"]),
    (["--tolerance=-1"], ["--tolerance"]),
])
def test_evaluate_arguments(args, needles, tmp_path, capsys):
  status = evaluate.main(["--workdir", str(tmp_path / "run"), "--out",
                          str(tmp_path / "out"), *args])
  _expect_user_error(capsys, status, *needles)
  assert not os.listdir(tmp_path)


def test_sweep_arguments(tmp_path, tfds_dir, capsys):
  config = [os.path.join(REPO, "configs/default.py:runlocal,epochs=1"),
            f"--config.data.data_dir={tfds_dir}"]
  workdir = f"--workdir={tmp_path}/sweep"
  status = sweep.main(["--config", *config, workdir, "--batch_sizes=0,-3"])
  _expect_user_error(capsys, status, "--batch_sizes", "positive integers")
  status = sweep.main(["--config", *config, workdir, "--trials=-2"])
  _expect_user_error(capsys, status, "--trials")
  # Found by tests/test_fuzz_cli.py: a ValueError traceback from Optuna.
  status = sweep.main(["--config", *config, workdir, "--sweep_seed=-1"])
  _expect_user_error(capsys, status, "--sweep_seed")
  # The search space against the config: micro-batches, then the devices.
  status = sweep.main(["--config", *config, "--config.grad_accum_steps=4",
                       workdir, "--batch_sizes=16,6"])
  _expect_user_error(capsys, status, "--batch_sizes", "batch_size=6",
                     "grad_accum_steps=4")
  status = sweep.main(["--config", *config, workdir, "--batch_sizes=16,12"])
  _expect_user_error(capsys, status, "--batch_sizes", "batch_size=12",
                     "devices")
  assert not os.listdir(tmp_path)


def test_export_and_predict_arguments(tmp_path, capsys):
  status = export.main(["--workdir", str(tmp_path / "run"), "--out",
                        str(tmp_path / "m.jaxexport"), "--platforms=cpu,gpu"])
  _expect_user_error(capsys, status, "--platforms", "cuda", "rocm")
  for flag in ("--batch=0", "--topk=0"):
    status = predict.main(["--workdir", str(tmp_path / "run"), "--images",
                           str(tmp_path), "--out", str(tmp_path / "o"), flag])
    _expect_user_error(capsys, status, flag.split("=")[0])
  status = aot.main(["--config", os.path.join(REPO, "configs/default.py"),
                     "--topology=v9z:2x2", "--fit_dtypes=float16"])
  _expect_user_error(capsys, status, "--fit_dtypes", "bfloat16")
  assert not os.listdir(tmp_path)
