"""PyTorch checkpoint files (``.pth``, ``.pt``, ``.bin``) read without PyTorch.

``torch.save`` (PyTorch 1.6 and later) writes a zip archive: ``<name>/data.pkl``
is a pickle of the saved object in which each tensor is a call of
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and
each storage a persistent id ``('storage', torch.<Type>Storage, key, device,
numel)`` naming its raw bytes, ``<name>/data/<key>``, whose byte order
``<name>/byteorder`` gives. ``load`` unpickles ``data.pkl`` with an unpickler
that resolves only those names (and ``collections.OrderedDict``), as
``torch.load(weights_only=True)`` restricts its own, so a file cannot run
code; tensors become numpy arrays. A file in the legacy format (PyTorch
before 1.6, not a zip) is handed to PyTorch when it is installed.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import jax
import ml_dtypes
import numpy as np

from brnpa_jax.errors import BadInputError

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
# The pickled magic number that opens a legacy-format file.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class _Storage:
  """What ``torch.<Type>Storage`` names inside the pickle: a dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused):
  """``torch._utils._rebuild_tensor_v2``: a strided view of a storage, copied."""
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(size), tuple(stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise pickle.UnpicklingError(
        f"a tensor of size {size} at offset {offset} lies outside its storage "
        f"of {storage.size} elements.")
  return np.lib.stride_tricks.as_strided(
      storage[offset:], size, [s * storage.itemsize for s in stride]).copy()


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    # nn.Parameter: its data is the tensor.
    ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *unused: data,
    **{("torch", name): _Storage(dtype) for name, dtype in _DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Resolves the names of ``_GLOBALS`` only; storages come from the zip."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, order: str):
    super().__init__(file)
    self._archive, self._prefix, self._order = archive, prefix, order
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise pickle.UnpicklingError(
          f"{module}.{name} is not allowed in a weights file (only tensors, "
          "storages and dicts are read).")
    return _GLOBALS[(module, name)]

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != "storage" or not isinstance(storage_type, _Storage):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}.")
    if key not in self._storages:
      data = self._archive.read(f"{self._prefix}data/{key}")
      dtype = storage_type.dtype.newbyteorder(self._order)
      array = np.frombuffer(data, dtype)
      if array.size < numel:
        raise pickle.UnpicklingError(
            f"storage {key} holds {array.size} values, the file says {numel}.")
      self._storages[key] = array[:numel].astype(dtype.newbyteorder("="))
    return self._storages[key]


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise BadInputError(f"{path} is a zip archive but not a PyTorch file "
                          f"(it holds {len(pickles)} data.pkl records).")
    prefix = pickles[0][:-len("data.pkl")]
    order = "<"
    if f"{prefix}byteorder" in archive.namelist():
      order = ">" if archive.read(f"{prefix}byteorder") == b"big" else "<"
    with archive.open(pickles[0]) as f:
      return _Unpickler(f, archive, prefix, order).load()


def _load_legacy(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{path} is in PyTorch's legacy (before 1.6) format: reading it needs "
        "PyTorch (pip install torch). Without it, convert the checkpoint once "
        "where PyTorch is installed (python -m brnpa_jax.tools.convert_weights "
        "--weights IN --out OUT.npz) or use its .safetensors version.") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  return jax.tree.map(lambda v: v.detach().float().numpy()
                      if isinstance(v, torch.Tensor) else v, obj)


def load(path: str):
  """The object a PyTorch file holds, its tensors as numpy arrays.

  Args:
    path: a file written by ``torch.save``.

  Returns:
    The saved object (for weights, a dict of name -> numpy array, native
    byte order, the tensor's dtype; bfloat16 as ``ml_dtypes.bfloat16``).

  Raises:
    BadInputError: the file is not a PyTorch file, or its pickle names
      anything but tensors, storages and dicts.
    ImportError: a legacy-format file and no PyTorch to read it.
  """
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  with open(path, "rb") as f:
    if f.read(len(_LEGACY_MAGIC)) != _LEGACY_MAGIC:
      raise BadInputError(f"{path} is not a PyTorch file (neither a zip "
                          "archive nor the legacy format).")
  return _load_legacy(path)
