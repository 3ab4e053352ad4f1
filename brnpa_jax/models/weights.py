"""Pretrained weights: read torchvision / timm checkpoints, load strictly.

ResNets: torchvision's and timm's share one key layout (``conv1.weight``,
``bn1.running_mean``, ``layer2.0.downsample.1.weight``, ``fc.bias``, ...).
``torch_to_flat`` renames those keys into the ``Classifier``'s variable tree
(``params/backbone/layer2_0/downsample_bn/scale``, ``params/classifier/kernel``)
and lays the arrays out for Flax: conv kernels OIHW -> HWIO, dense (out, in) ->
(in, out), BatchNorm statistics into ``batch_stats``. timm's ``convnext_*``
and ``vit_*`` / ``deit_*`` state dicts are recognised by their keys and
renamed by ``models/timm_names.py`` (``stages.1.blocks.0.conv_dw.weight`` ->
``params/backbone/stages_1/blocks_0/conv_dw/kernel``, ConvNeXt's
``head.norm`` -> ``params/head_norm``). ``load_pretrained`` then checks the
result against a model's variables and refuses any missing, unexpected or
mis-shaped key, listing all of them.

Files: ``.safetensors``, ``.npz`` and PyTorch's ``.pth``, ``.pt`` and ``.bin``
are read without PyTorch (``models/torch_pickle.py``; only PyTorch's legacy
pre-1.6 format needs it). A ``.npz`` written by
``python -m brnpa_jax.tools.convert_weights`` already holds our names.
Strides, ViT patch overlap and the input size are not weights, so one
checkpoint loads into every resolution of its backbone.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from brnpa_jax.errors import BadInputError, InputNotFoundError
from brnpa_jax.models import timm_names, torch_pickle

# Top-level modules a checkpoint supplies besides the classifier: the
# backbone and ConvNeXt's norm of the pooled vector.
PRETRAINED = ("backbone", "head_norm")
CLASSIFIER = "params/classifier/"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# BatchNorm's update counter: torchvision stores it, nothing reads it.
_IGNORED = ("num_batches_tracked",)
_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")
_BN_NAMES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}


def _torch_module(name: str) -> str:
  """``layer1.0.downsample.1`` -> ``layer1_0/downsample_bn``."""
  name = _BLOCK.sub(r"layer\1_\2/", name)
  return name.replace("downsample.0", "downsample_conv").replace(
      "downsample.1", "downsample_bn")


def torch_name_to_flat(key: str) -> str | None:
  """Our flat variable name for a torchvision key, or None if it has none."""
  module, _, leaf = key.rpartition(".")
  if module == "fc" and leaf in ("weight", "bias"):
    return CLASSIFIER + ("kernel" if leaf == "weight" else "bias")
  ours = _torch_module(module)
  last = ours.rsplit("/", 1)[-1]
  if "." in ours or not re.fullmatch(r"(conv|bn)\d|downsample_(conv|bn)", last):
    return None  # e.g. timm's deep stem ``conv1.0``: not our architecture
  if last.startswith("conv") or last == "downsample_conv":
    return f"params/backbone/{ours}/kernel" if leaf == "weight" else None
  if leaf not in _BN_NAMES:
    return None
  collection, name = _BN_NAMES[leaf]
  return f"{collection}/backbone/{ours}/{name}"


def flat_name_to_torch(flat: str) -> str:
  """The torchvision key of one of our flat names (for error messages)."""
  if flat.startswith(CLASSIFIER):
    return "fc." + ("weight" if flat.endswith("kernel") else "bias")
  collection, _, rest = flat.partition("/backbone/")
  module, _, leaf = rest.rpartition("/")
  module = re.sub(r"^layer(\d+)_(\d+)/", r"layer\1.\2.", module)
  module = module.replace("downsample_conv", "downsample.0").replace(
      "downsample_bn", "downsample.1")
  names = {("params", "kernel"): "weight", ("params", "scale"): "weight",
           ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
           ("batch_stats", "var"): "running_var"}
  return f"{module}.{names.get((collection, leaf), leaf)}"


def to_flax_layout(flat: str, array: np.ndarray) -> np.ndarray:
  if flat.endswith("/kernel") and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if flat.endswith("/kernel") and array.ndim == 2:
    return array.T  # (out, in) -> (in, out)
  return array


def torch_to_flat(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Renames and re-lays a torchvision / timm state dict (module docstring).

  Args:
    state_dict: PyTorch key -> array (numpy or anything ``np.asarray``
      takes). Keys may carry the ``module.`` prefix of ``DataParallel``.

  Returns:
    Our flat name -> float32 array. Keys without a counterpart keep their
    PyTorch name, so the strict loader reports them as unexpected.
  """
  state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
  family = timm_names.source_family(state_dict)
  out = {}
  for key, value in state_dict.items():
    if key.rsplit(".", 1)[-1] in _IGNORED:
      continue
    flat = (timm_names.timm_name_to_flat(family, key) if family
            else torch_name_to_flat(key))
    array = np.asarray(value, np.float32)
    out[key if flat is None else flat] = (
        array if flat is None else to_flax_layout(flat, array))
  return out


def _is_ours(keys) -> bool:
  return bool(keys) and all(k.startswith(("params/", "batch_stats/")) for k in keys)


def _read_torch(path: str) -> dict[str, np.ndarray]:
  obj = torch_pickle.load(path)
  # Training checkpoints wrap the weights (timm: state_dict / state_dict_ema).
  for wrapper in ("state_dict", "model", "state_dict_ema"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise BadInputError(f"{path} holds a {type(obj).__name__}, not a state dict "
                     "(save model.state_dict(), not the model).")
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Reads a checkpoint into our flat names (see module docstring).

  Args:
    path: ``.safetensors``, ``.npz`` (torchvision names or ours), or
      ``.pth`` / ``.pt`` / ``.bin`` (``torch.save``'s files).

  Returns:
    Flat name -> float32 array, ready for ``load_pretrained``.
  """
  if not os.path.exists(path):
    raise InputNotFoundError(f"No weights file at {path!r}.")
  if not path.endswith((".safetensors", ".npz") + TORCH_SUFFIXES):
    raise BadInputError(f"Unknown weights format {path!r}: use .safetensors, "
                        f".npz, or {'/'.join(TORCH_SUFFIXES)} (PyTorch).")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"Reading {path} needs safetensors "
                        "(pip install safetensors).") from e
  try:
    if path.endswith(".safetensors"):
      raw = load_file(path)
    elif path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        raw = {k: f[k] for k in f.files}
    else:
      raw = _read_torch(path)
  except (ImportError, BadInputError):
    raise
  except Exception as e:  # each reader has its own error types
    raise BadInputError(
        f"Cannot read {path} as a {os.path.splitext(path)[1]} checkpoint "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
        "the file is truncated, corrupt or in another format.") from e
  if _is_ours(raw):
    return {k: np.asarray(v, np.float32) for k, v in raw.items()}
  return torch_to_flat(raw)


def top_module(flat: str) -> str:
  """``backbone`` for ``params/backbone/...``."""
  return flat.split("/")[1] if flat.count("/") >= 2 else ""


def source_name(flat: str, family: str | None) -> str:
  """The PyTorch key of one of our flat names in a ``family`` layout
  (``timm_names.flat_family``; None: torchvision ResNet)."""
  return (timm_names.flat_name_to_timm(family, flat) if family
          else flat_name_to_torch(flat))


def _listing(kind: str, keys, family: str | None = None, detail=lambda k: "",
             torch_names: bool = True) -> list[str]:
  if not keys:
    return []
  keys = sorted(keys)
  lines = [f"  {kind} ({len(keys)}):"]
  for k in keys:
    ours = torch_names and (top_module(k) in PRETRAINED
                            or k.startswith(CLASSIFIER))
    torch_name = f" [{source_name(k, family)}]" if ours else ""
    lines.append(f"    {k}{torch_name}{detail(k)}")
  return lines


def layout(flat: Mapping[str, Any]) -> tuple[int, tuple[int, ...], int | None]:
  """``(block expansion, blocks per stage, stem width)`` of flat weights: 1
  for basic blocks, 4 for bottlenecks; width None without a stem conv."""
  stages = {}
  for k in flat:
    m = re.match(r"params/backbone/layer(\d+)_(\d+)/", k)
    if m:
      stages[int(m[1])] = max(stages.get(int(m[1]), 0), int(m[2]) + 1)
  stem = flat.get("params/backbone/conv1/kernel")
  return (4 if any("/conv3/" in k for k in flat) else 1,
          tuple(stages[s] for s in sorted(stages)),
          None if stem is None else int(stem.shape[-1]))


def describe(flat: Mapping[str, Any]) -> str:
  """E.g. 'bottleneck blocks (3, 4, 6, 3), width 64, 1000 classes' (ResNets;
  ConvNeXt and ViT: ``timm_names.describe``)."""
  family = timm_names.flat_family(flat)
  if family:
    return timm_names.describe(family, flat)
  expansion, stages, width = layout(flat)
  fc = flat.get(CLASSIFIER + "kernel")
  return (f"{'bottleneck' if expansion == 4 else 'basic'} blocks {stages}, "
          f"width {width}, "
          + (f"{fc.shape[-1]} classes" if fc is not None else "no classifier"))


def key_differences(source: Mapping[str, Any], target: Mapping[str, Any]
                    ) -> tuple[set[str], set[str], set[str]]:
  """``(missing, unexpected, mis-shaped)`` keys of flat ``source`` arrays
  against flat ``target`` ones (anything with a ``shape``)."""
  missing = set(target) - set(source)
  unexpected = set(source) - set(target)
  misshaped = {k for k in set(target) & set(source)
               if tuple(np.shape(source[k])) != tuple(np.shape(target[k]))}
  return missing, unexpected, misshaped


def check_same_tree(loaded, target, *, what: str, hint: str = "") -> None:
  """Raises ``ValueError`` listing every missing, unexpected and mis-shaped
  leaf of the ``loaded`` variable tree against ``target`` (arrays or
  ``jax.ShapeDtypeStruct``s); the strict check of ``load_pretrained``, for
  variables restored from a run's checkpoint.

  Args:
    loaded: nested dict of arrays, e.g. ``{'params': ..., 'batch_stats': ...}``.
    target: the same of the model that should receive them.
    what: names the source in the message, e.g. ``the checkpoint in runs/x``.
    hint: a last line saying how to fix it.
  """
  flat = lambda t: traverse_util.flatten_dict(dict(t), sep="/")
  src, dst = flat(loaded), flat(target)
  missing, unexpected, misshaped = key_differences(src, dst)
  if missing or unexpected or misshaped:
    shapes = lambda k: (f": checkpoint {tuple(np.shape(src[k]))}, "
                        f"model {tuple(np.shape(dst[k]))}")
    listing = lambda *a: _listing(*a, torch_names=False)
    lines = ([f"The variables in {what} do not fit the model."]
             + listing("missing", missing) + listing("unexpected", unexpected)
             + listing("mis-shaped", misshaped, None, shapes))
    raise ValueError("\n".join(lines + ([f"  {hint}"] if hint else [])))


def load_pretrained(variables: Mapping[str, Any], source, *,
                    skip_classifier: bool = False) -> dict[str, Any]:
  """Loads a checkpoint into a ``Classifier``'s variables, strictly.

  Every backbone parameter and BatchNorm statistic (and ConvNeXt's
  ``head_norm``) must come from the checkpoint, with the model's shape, and
  the checkpoint may hold nothing else; otherwise a ``ValueError`` lists
  every missing, unexpected and mis-shaped key (our name, then the PyTorch
  key in brackets).

  Args:
    variables: the model's ``{'params': ..., 'batch_stats': ...}`` (arrays or
      ``jax.ShapeDtypeStruct``s: only shapes are read).
    source: a path (see ``read_checkpoint``) or a flat dict from it.
    skip_classifier: keep the model's own classifier and ignore ``fc.*`` in
      the checkpoint (which may then lack it): fine-tuning on other classes.

  Returns:
    The variables with every loaded leaf replaced by a float32 numpy array;
    the rest (classifier when skipped, head parameters) are the input's
    leaves, unchanged.
  """
  where = source if isinstance(source, str) else "the checkpoint"
  flat_src = read_checkpoint(source) if isinstance(source, str) else dict(source)
  flat_dst = traverse_util.flatten_dict(dict(variables), keep_empty_nodes=True,
                                       sep="/")
  wanted = {k for k in flat_dst if top_module(k) in PRETRAINED
            or (k.startswith(CLASSIFIER) and not skip_classifier)}
  family = timm_names.flat_family(flat_dst)
  about_src = describe(flat_src)
  if skip_classifier:
    flat_src = {k: v for k, v in flat_src.items() if not k.startswith(CLASSIFIER)}
  missing, unexpected, misshaped = key_differences(
      flat_src, {k: flat_dst[k] for k in wanted})
  if missing or unexpected or misshaped:
    shapes = lambda k: (f": checkpoint {tuple(flat_src[k].shape)}, "
                        f"model {tuple(flat_dst[k].shape)}")
    lines = ([f"Weights in {where} do not fit the model."]
             + _listing("missing", missing, family)
             + _listing("unexpected", unexpected, family)
             + _listing("mis-shaped", misshaped, family, shapes)
             + [f"  checkpoint: {about_src}; model: {describe(flat_dst)}."])
    if any(k.startswith(CLASSIFIER) for k in missing | misshaped):
      lines.append("  To fine-tune on other classes, skip the classifier "
                   "(skip_classifier=True; config.init_from always does).")
    raise ValueError("\n".join(lines))
  for k in wanted:
    flat_dst[k] = flat_src[k]
  return traverse_util.unflatten_dict(flat_dst, sep="/")


def load_into_state(state, path: str, shardings):
  """A fresh train state with its backbone loaded from ``path``.

  The classifier is skipped (it keeps its initialisation); BatchNorm
  statistics go into ``batch_stats``. The optimiser state is kept: at
  initialisation it does not depend on the parameter values (zero moments).

  Args:
    state: a ``TrainState`` just initialised.
    path: a weights file (see ``read_checkpoint``).
    shardings: the state's shardings; loaded arrays are placed with them
      (each process reads the file and supplies its own shards).

  Returns:
    The state with loaded ``params`` / ``batch_stats`` leaves.
  """
  old = {"params": state.params, "batch_stats": state.batch_stats}
  new = load_pretrained(old, path, skip_classifier=True)
  placed = {"params": shardings.params, "batch_stats": shardings.batch_stats}
  put = lambda n, o, sh: o if n is o else jax.make_array_from_callback(
      n.shape, sh, lambda index: n[index])
  new = jax.tree.map(put, new, old, placed)
  return state.replace(params=new["params"], batch_stats=new["batch_stats"])
