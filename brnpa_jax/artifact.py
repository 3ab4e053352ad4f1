r"""The exported-model artifact: ``jax.export`` of the inference function in a
file that runs without the model code (written by ``python -m
brnpa_jax.export``).

This module needs only jax and numpy: a service can copy it alone and
``load_exported`` the file. The function exported is
``models.classifier.make_infer_fn``: normalised images (b, S, S, 3) ->
``{'probs' (b, classes), 'maps' (b, K, h, w), 'norms' (b, h, w)}`` with a
symbolic batch dimension ``b``, so one artifact serves any batch size. The file is a NumPy ``.npz`` archive (zip, no pickle):

- ``exported``: ``jax.export.Exported.serialize()`` bytes (StableHLO);
- ``meta``: JSON text: the input (``image_size``, ``input_dtype``, the
  ``normalization`` mean, std and scale, ``resize_ratio`` of the resize and
  centre crop before it), ``num_classes`` and ``class_names``, the model
  config, the run and checkpoint it came from, the platforms it was lowered
  for;
- ``var_00000``, ...: the model variables, in the order of the exported
  function's inputs (passed as arguments rather than baked in as constants,
  so the compiled program is the one ``predict`` runs on the model and the
  outputs are the same).

Artifacts lowered for several platforms (``--platforms cpu,cuda``) run on
each of them. ``ExportedModel.compile(images, devices)`` runs the function
data-parallel: the batch split over the devices, the exported function
called on each part under ``jax.shard_map`` (it was lowered for one device,
so it runs on any number of them).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

try:  # a user mistake for the command-line tools; standalone, any exception
  from brnpa_jax.errors import UserError
except ImportError:
  UserError = Exception

FORMAT = "brnpa_jax.export/1"


class ExportError(FileNotFoundError, UserError):
  """No artifact at the path given."""


class ArtifactError(ValueError, UserError):
  """A file that is not a readable artifact of this format."""


class ExportedModel:
  """A deserialized artifact: ``model(images) -> {'probs', 'maps', 'norms'}``.

  Attributes:
    exported: the ``jax.export.Exported``.
    meta: the artifact's metadata dict (see the module docstring).
  """

  def __init__(self, exported: jax.export.Exported, leaves: Sequence[np.ndarray],
               meta: dict[str, Any]):
    if len(leaves) + 1 != len(exported.in_avals):
      raise ValueError(f"the artifact has {len(leaves)} variables but its "
                       f"function takes {len(exported.in_avals) - 1}; the file "
                       "is damaged: export it again.")
    self.exported = exported
    self.meta = meta
    self._leaves = [jax.device_put(x) for x in leaves]
    self._call = jax.jit(self._apply)

  def _apply(self, leaves, images):
    args, kwargs = jax.tree.unflatten(self.exported.in_tree, [*leaves, images])
    return self.exported.call(*args, **kwargs)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(S, S, 3): the input of one image."""
    return tuple(int(d) for d in self.exported.in_avals[-1].shape[1:])

  @property
  def class_names(self) -> list[str] | None:
    """The classes in output order, when the training run had names."""
    return self.meta.get("class_names")

  def normalize(self, images_uint8) -> np.ndarray:
    """uint8 RGB images (B, S, S, 3), already resized and cropped to S, ->
    the normalised float32 input the model takes."""
    norm = self.meta.get("normalization")
    if norm is None:
      raise ArtifactError("this artifact does not record its normalisation: "
                          "export it again with this version.")
    x = np.asarray(images_uint8, np.float32) * np.float32(norm["scale"])
    return (x - np.float32(norm["mean"])) / np.float32(norm["std"])

  def __call__(self, images_BxSxSx3) -> dict[str, jax.Array]:
    """Outputs for normalised float images (B, S, S, 3); see ``normalize``."""
    dtype = getattr(images_BxSxSx3, "dtype", None)
    if dtype is None:
      dtype = np.asarray(images_BxSxSx3).dtype
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
      raise ArtifactError(
          f"images are {dtype}: the model takes normalised float32 images; "
          "normalise first with model.normalize(images) ((x / 255 - mean) / "
          "std, the artifact's meta['normalization']).")
    images = jax.numpy.asarray(images_BxSxSx3, jax.numpy.float32)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ArtifactError(f"images must be (B, "
                          f"{', '.join(map(str, self.image_shape))}), got "
                          f"{images.shape}.")
    return self._call(self._leaves, images)

  def compile(self, images_BxSxSx3, devices: Sequence[jax.Device] | None = None):
    """``images -> outputs`` compiled ahead of time for this batch shape.

    Args:
      images_BxSxSx3: an array (or ``ShapeDtypeStruct``) of the batch shape.
      devices: run data-parallel over these devices (the batch split over
        them, the variables replicated on each: the exported function is
        called on each device's part under ``jax.shard_map``); the batch
        must divide over them. None: one device, as ``__call__`` does.

    Returns:
      ``images -> outputs``, dispatched asynchronously.
    """
    shape = tuple(images_BxSxSx3.shape)
    if not devices:
      compiled = self._call.lower(self._leaves, jax.ShapeDtypeStruct(
          shape, jax.numpy.float32)).compile()
      return lambda images: compiled(self._leaves, images)
    if shape[0] % len(devices):
      raise ArtifactError(f"a batch of {shape[0]} does not divide over "
                          f"{len(devices)} devices.")
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    leaves = jax.device_put(self._leaves, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    call = jax.jit(jax.shard_map(
        self._apply, mesh=mesh, out_specs=jax.sharding.PartitionSpec("batch"),
        in_specs=(jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("batch"))))
    compiled = call.lower(leaves, jax.ShapeDtypeStruct(
        shape, jax.numpy.float32, sharding=split)).compile()
    return lambda images: compiled(leaves, jax.device_put(images, split))


def export_inference(infer, variables, image_size: int,
                     platforms: Sequence[str] | None = None) -> jax.export.Exported:
  """``jax.export`` of ``infer(variables, images)`` with a symbolic batch.

  Args:
    infer: ``(variables, images) -> outputs``, e.g. ``make_infer_fn(model)``.
    variables: the model variables (arrays or ShapeDtypeStructs).
    image_size: S, the square input side.
    platforms: e.g. ``('cpu', 'cuda')``; default the current backend.
  """
  (b,) = jax.export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((b, image_size, image_size, 3), np.float32)
  var_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                           variables)
  return jax.export.export(jax.jit(infer), platforms=platforms)(var_specs, images)


def save_exported(path: str, exported: jax.export.Exported, variables,
                  meta: dict[str, Any]) -> str:
  """Writes the artifact (see the module docstring); returns ``path``."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(variables)]
  arrays = {f"var_{i:05d}": x for i, x in enumerate(leaves)}
  meta = dict(meta, format=FORMAT, platforms=list(exported.platforms))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # a file object: np.savez would append .npz
    np.savez(f, exported=np.frombuffer(bytes(exported.serialize()), np.uint8),
             meta=np.array(json.dumps(meta)), **arrays)
  return path


def load_exported(path: str) -> ExportedModel:
  """Reads an artifact written by ``save_exported`` (jax and numpy only)."""
  if not os.path.isfile(path):
    raise ExportError(f"no exported model at {path}; make one with "
                      "python -m brnpa_jax.export --workdir RUN --out FILE.")
  try:
    with np.load(path, allow_pickle=False) as z:
      if "exported" not in z or "meta" not in z:
        raise ArtifactError(f"{path} is not a brnpa_jax export (no "
                            "'exported'/'meta').")
      meta = json.loads(str(z["meta"]))
      if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{path} has format {got!r}; this code reads "
                            f"{FORMAT!r}.")
      exported = jax.export.deserialize(bytearray(z["exported"].tobytes()))
      names = sorted(k for k in z.files if k.startswith("var_"))
      leaves = [z[k] for k in names]
  except (ArtifactError, OSError):  # an OSError names the path (cli.run)
    raise
  except Exception as e:  # pylint: disable=broad-except  # the file's bytes
    # A truncated or damaged file fails in the zip reader, numpy's or
    # jax's deserialiser, with whatever they raise.
    text = str(e).strip().splitlines()
    raise ArtifactError(
        f"{path} cannot be read as a brnpa_jax export ({type(e).__name__}"
        f"{': ' + text[0] if text else ''}): the file is truncated or "
        "damaged; export the run again.") from e
  return ExportedModel(exported, leaves, meta)
