"""Image-folder datasets: one sub-folder per class, as torchvision reads them.

Layout (``root`` is ``data.data_dir``)::

  root/train/<class>/<image>        required
  root/validation/<class>/<image>   optional (or root/val/); without it,
                                    VALIDATION_PERCENT of each class of
                                    train/ (rounded, at least one image of
                                    a class with two or more, never all)
                                    is held out for validation
  root/test/<class>/<image>         optional

Instead of ``train/`` (``validation/``, ``test/``), a split may be the one
folder of ``root`` whose name ends in ``_train`` (``_val``, ``_test``): the
authors' release reads ``data/CUB-200-2011_train`` and ``..._test``, so
``data_dir=data`` works on their layout as it is. ``python -m
brnpa_jax.data.image_folder --cub_dir CUB_200_2011 --out OUT`` arranges the CUB
archive (``images/``, ``images.txt``, ``train_test_split.txt``) into
``OUT/train`` and ``OUT/test`` with symbolic links.

The class index is the position of the folder name in the sorted names of
``train/``; ``validation/`` and ``test/`` may only use those names. A class
folder of ``train/`` without a readable image is an error naming it (a class
the model could never learn). Files are listed by
``image_files.list_images``: images in nested folders of a class folder
belong to the class; files whose extension is not an image's and hidden
entries are ignored, as torchvision's ``ImageFolder`` does; links are
followed, a folder reached twice is read once, and a broken link is an
unreadable file.

Opening the folder scans it once per process (cached): every image's header
is read with Pillow, and with ``verify`` (the default) every image is also
decoded once, in threads, so that a truncated or otherwise corrupt file, or
one over the pixel limit (``max_pixels``), is reported by its path before
training starts rather than as an anonymous TensorFlow error mid-epoch (on
CUB's 11,788 JPEGs: a few seconds on a 16-core machine). A corrupt file is an
error naming the paths, or, with ``on_corrupt='skip'``, a warning listing
them, and the file is left out.

Decoding is ``image_files.decode_file``: TensorFlow's native ops inside
tf.data where they give exactly Pillow's pixels, Pillow through
``tf.py_function`` elsewhere, every mode converted by its value range
(``image_files`` says how: 16-bit, float, alpha, EXIF orientation).

The validation split and the order of every split are fixed by a hash of
(``seed``, relative path): they do not depend on the machine, on the numpy
version, or on files added to other classes, and contiguous slices (one per
process) mix the classes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
from typing import Sequence

import numpy as np
from absl import flags

from brnpa_jax import cli, quiet
from brnpa_jax.errors import InputNotFoundError
from brnpa_jax.data import image_files
from brnpa_jax.data.catalog import VALIDATION_PERCENT, DatasetNotPreparedError
from brnpa_jax.data.image_files import CorruptImageError

tf = quiet.tensorflow()

# Folder names of each split: the exact name, else one folder ending in
# ``_<name>`` (the authors' release reads data/CUB-200-2011_train and _test).
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val"),
                 "test": ("test",)}
ON_CORRUPT = image_files.ON_CORRUPT

# Appended to a message about the folder's layout: one more line at most,
# as every user error (the full layout: docs/datasets.md#image-folders).
LAYOUT_HELP = ("Expected {root}/train/<class>/<image> (validation/ or "
               "val/, test/ optional; else {pct}% of train/ is held out), see "
               "docs/datasets.md#image-folders; data.data_dir (data_dir=) "
               "names the folder that holds train/.")


@dataclasses.dataclass(frozen=True)
class ImageFile:
  path: str
  label: int
  kind: int  # image_files.NATIVE_JPEG, NATIVE_PNG or PILLOW


def _order_key(seed: int, relpath: str) -> str:
  # The name's bytes, whatever they are (os.fsencode: UTF-8 for valid names).
  return hashlib.sha1(f"{seed}:".encode() + os.fsencode(relpath)).hexdigest()


def _find_split_folder(root: str, names: Sequence[str]) -> str | None:
  """``root/<name>``, else the one ``root/*_<name>`` folder, else None."""
  if not os.path.isdir(root):
    return None
  for name in names:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  entries = sorted(e.name for e in os.scandir(root) if e.is_dir())
  found = [e for e in entries if any(e.endswith(f"_{n}") for n in names)]
  if len(found) > 1:
    raise DatasetNotPreparedError(
        f"Several {names[0]} folders in {root}: {found}. Point data.data_dir "
        f"at a folder holding one dataset's {names[0]}/ folder.")
  return os.path.join(root, found[0]) if found else None


class ImageFolder:
  """A scanned image-folder dataset (see the module docstring).

  Args:
    root: the folder holding ``train/`` (and optionally ``validation/`` or
      ``val/``, and ``test/``).
    validation_percent: share of each class of ``train/`` held out for
      validation when there is no validation folder (at least one image of
      each class with two or more, never all of a class); 0 holds out none.
    seed: fixes the held-out files and the order of each split.
    verify: decode every image once while scanning.
    on_corrupt: ``'error'`` or ``'skip'`` (with a warning).
    workers: threads for scanning (0: from the CPU count).
    max_pixels: larger images are corrupt (``image_files.MAX_PIXELS``).
  """

  def __init__(self, root: str, *, validation_percent: float = VALIDATION_PERCENT,
               seed: int = 0, verify: bool = True, on_corrupt: str = "error",
               workers: int = 0, max_pixels: int = image_files.MAX_PIXELS):
    if on_corrupt not in ON_CORRUPT:
      raise ValueError(f"on_corrupt={on_corrupt!r}: use one of {ON_CORRUPT}.")
    self.max_pixels = max_pixels
    if not 0 <= validation_percent < 100:
      raise ValueError(f"validation_percent={validation_percent}: use [0, 100).")
    self.root = os.path.abspath(os.path.expanduser(root))
    help_text = LAYOUT_HELP.format(root=self.root, pct=validation_percent)
    folders = {s: _find_split_folder(self.root, names)
               for s, names in SPLIT_FOLDERS.items()}
    if folders["train"] is None:
      raise DatasetNotPreparedError(
          (f"No train/ folder in {self.root}. " if os.path.isdir(self.root)
           else f"Image folder {self.root} does not exist. ") + help_text)
    self.classes = image_files.list_folders(folders["train"])
    if not self.classes:
      raise DatasetNotPreparedError(
          f"{folders['train']} has no class sub-folders. " + help_text)
    self.seed = seed
    files = {s: self._list(f, s, help_text) for s, f in folders.items() if f}
    self._kinds = self._scan([p for ps in files.values() for p, _ in ps],
                             verify, on_corrupt, workers)
    files = {s: [(p, y) for p, y in ps if p in self._kinds]
             for s, ps in files.items()}
    self._refuse_empty_classes(folders["train"], files["train"])
    if folders["validation"] is None:
      files["train"], files["validation"] = self._hold_out(files["train"],
                                                           validation_percent)
    files["trainval"] = files["train"] + files["validation"]
    self._splits = {s: self._ordered(ps) for s, ps in files.items()}

  def _list(self, folder: str, split: str, help_text: str):
    unknown = sorted(set(image_files.list_folders(folder)) - set(self.classes))
    if unknown:
      raise DatasetNotPreparedError(
          f"{folder} has class folders that train/ lacks: {unknown[:5]}. "
          + help_text)
    out = []
    for label, name in enumerate(self.classes):
      if os.path.isdir(os.path.join(folder, name)):
        class_folder = os.path.join(folder, name)
        out += [(os.path.join(class_folder, p), label)
                for p in image_files.list_images(class_folder)]
    if not out and split == "train":
      raise DatasetNotPreparedError(f"No images under {folder}. " + help_text)
    return out

  def _scan(self, paths, verify, on_corrupt, workers):
    workers = workers or min(32, 2 * (os.cpu_count() or 1))

    def one(path):
      try:
        return path, image_files.inspect_image(
            path, verify=verify, max_pixels=self.max_pixels), None
      except CorruptImageError as e:
        return path, None, str(e)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      results = list(pool.map(one, paths))
    bad = [err for _, _, err in results if err]
    if bad and on_corrupt == "error":
      more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
      raise CorruptImageError(
          f"{len(bad)} unreadable image file(s) in "
          f"{image_files.message_name(self.root)}: " + " | ".join(bad[:3])
          + f"{more}. Replace or delete them, or set "
          "data.folder.on_corrupt='skip' to leave them out.")
    if bad:
      listing = "\n  ".join(bad[:20]) + (f"\n  ... ({len(bad) - 20} more)"
                                          if len(bad) > 20 else "")
      logging.warning("Skipping %d unreadable image file(s) in %s:\n  %s",
                      len(bad), image_files.message_name(self.root), listing)
    return {p: kind for p, kind, err in results if not err}

  def _refuse_empty_classes(self, folder: str, files) -> None:
    """A class of train/ without an image is one the model cannot learn."""
    have = {label for _, label in files}
    empty = [image_files.message_name(c) for i, c in enumerate(self.classes)
             if i not in have]
    if empty:
      raise DatasetNotPreparedError(
          f"{len(empty)} class folder(s) of {image_files.message_name(folder)} "
          f"hold no readable image: {', '.join(empty[:5])}"
          + (" ..." if len(empty) > 5 else "") + ". Add images to them or "
          "delete them (a class needs training images).")

  def _hold_out(self, files, percent):
    """(train, validation): ``percent`` of each class, chosen by hash."""
    by_class: dict[int, list[str]] = {}
    for path, label in files:
      by_class.setdefault(label, []).append(path)
    train, val = [], []
    for label, paths in by_class.items():
      ranked = sorted(paths, key=lambda p: _order_key(self.seed, self._rel(p)))
      n_val = int(round(len(paths) * percent / 100))
      if percent > 0 and len(paths) > 1:
        n_val = min(max(n_val, 1), len(paths) - 1)
      val += [(p, label) for p in ranked[:n_val]]
      train += [(p, label) for p in ranked[n_val:]]
    return train, val

  def _rel(self, path: str) -> str:
    return os.path.relpath(path, self.root).replace(os.sep, "/")

  def _ordered(self, files):
    files = sorted(files, key=lambda f: _order_key(self.seed, self._rel(f[0])))
    return [ImageFile(p, y, self._kinds[p]) for p, y in files]

  # -- the source interface of input_pipeline ---------------------------------
  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self._splits)

  def files(self, split: str) -> list[ImageFile]:
    """The files of ``split`` in serving order."""
    if split not in self._splits:
      raise ValueError(f"Image folder {self.root} has no split {split!r}; it has "
                       f"{sorted(self._splits)} (a test split needs a test/ "
                       "folder).")
    return self._splits[split]

  def num_classes(self) -> int:
    return len(self.classes)

  def class_names(self) -> list[str]:
    """The class folders' names (``image_files.display_name``), in label order."""
    return [image_files.display_name(c) for c in self.classes]

  def count(self, split: str) -> int:
    return len(self.files(split))

  def read(self, split: str, *, keep: Sequence[str], shuffle_seed=None,
           process_index: int = 0, process_count: int = 1,
           drop_remainder: bool = False, whole: bool = False):
    """This process's part of ``split`` (as ``TfdsSource.read``).

    Processes divide the split as ``tfds.even_splits`` does: contiguous
    parts, the first ``n % process_count`` one longer (or all
    ``n // process_count`` long with ``drop_remainder``). ``id`` is the
    position in the whole split.
    """
    files = self.files(split)
    n, start, stop = len(files), 0, len(files)
    if not whole:
      size, extra = divmod(n, process_count)
      start = process_index * size + (0 if drop_remainder
                                      else min(process_index, extra))
      stop = start + size + (0 if drop_remainder or process_index >= extra else 1)
    index = np.arange(start, stop)
    if shuffle_seed is not None:
      index = np.random.default_rng(shuffle_seed).permutation(index)
    part = [files[i] for i in index]
    ds = tf.data.Dataset.from_tensor_slices({
        "image": tf.constant([os.fsencode(f.path) for f in part], tf.string),
        "kind": tf.constant([f.kind for f in part], tf.int32),
        "label": tf.constant([f.label for f in part], tf.int64),
        "id": tf.constant(index, tf.int64)})
    wanted = set(keep) | {"image", "kind"}

    def decode(ex):
      out = {k: v for k, v in ex.items() if k in wanted and k != "kind"}
      out["image"] = image_files.decode_file(ex["image"], ex["kind"],
                                             max_pixels=self.max_pixels)
      return out
    return ds.map(lambda ex: {k: v for k, v in ex.items() if k in wanted}), decode


@functools.lru_cache(maxsize=8)
def load(root: str, validation_percent: float = VALIDATION_PERCENT, seed: int = 0,
         verify: bool = True, on_corrupt: str = "error",
         max_pixels: int = image_files.MAX_PIXELS) -> ImageFolder:
  """``ImageFolder(...)``, scanned once per process for the same arguments."""
  return ImageFolder(root, validation_percent=validation_percent, seed=seed,
                     verify=verify, on_corrupt=on_corrupt, max_pixels=max_pixels)


def arrange_cub(cub_dir: str, out: str, copy: bool = False) -> dict[str, int]:
  """Arranges the official CUB-200-2011 archive into ``out/{train,test}``.

  Args:
    cub_dir: the extracted ``CUB_200_2011`` folder (``images/``,
      ``images.txt``, ``train_test_split.txt``).
    out: the folder to create (``data_dir`` of ``dataset=folder``).
    copy: copy the images instead of linking them.

  Returns:
    Images per split, ``{'train': 5994, 'test': 5794}`` for CUB.
  """
  names_path = os.path.join(cub_dir, "images.txt")
  split_path = os.path.join(cub_dir, "train_test_split.txt")
  for path in (names_path, split_path, os.path.join(cub_dir, "images")):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing: cub_dir must be the extracted "
                              "CUB_200_2011 folder of CUB_200_2011.tgz.")
  with open(names_path) as f:
    names = dict(line.split() for line in f if line.strip())
  with open(split_path) as f:
    is_train = dict(line.split() for line in f if line.strip())
  counts = {"train": 0, "test": 0}
  for image_id, rel in names.items():
    split = "train" if is_train[image_id] == "1" else "test"
    src = os.path.abspath(os.path.join(cub_dir, "images", rel))
    dst = os.path.join(out, split, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.lexists(dst):
      if copy:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
          fo.write(fi.read())
      else:
        os.symlink(src, dst)
    counts[split] += 1
  return counts


ARRANGE_DOC = """Arranges the extracted CUB_200_2011 archive into the image folder layout
(OUT/train/<class>/, OUT/test/<class>/) that dataset=folder,data_dir=OUT reads.

  python -m brnpa_jax.data.image_folder --cub_dir CUB_200_2011 --out data/cub_folder
"""


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("cub_dir", None, "The extracted CUB_200_2011 folder.",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "The folder to create.", flag_values=fv)
  flags.DEFINE_bool("copy", False, "Copy the images instead of symbolic links.",
                    flag_values=fv)
  flags.mark_flags_as_required(["cub_dir", "out"], flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  if not os.path.isdir(fv.cub_dir):
    raise InputNotFoundError(
        f"--cub_dir={fv.cub_dir}: no such folder; give the extracted "
        "CUB_200_2011 archive (the folder holding images.txt).")
  counts = arrange_cub(fv.cub_dir, fv.out, fv.copy)
  print(f"{fv.out}: {counts['train']} train and {counts['test']} test images.")


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: ``python -m brnpa_jax.data.image_folder --cub_dir DIR --out OUT``."""
  return cli.run(_define, _main, doc=ARRANGE_DOC, argv=argv, start_jax=False,
                 prog="python -m brnpa_jax.data.image_folder")


if __name__ == "__main__":
  raise SystemExit(main())
