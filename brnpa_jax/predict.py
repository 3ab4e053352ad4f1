r"""Batch inference: top-k predictions, ranked maps and norms, optional overlays.

  python -m brnpa_jax.predict --workdir runs/default --images photos/ --out preds/
  python -m brnpa_jax.predict --workdir runs/default --images test --out preds/ --overlays
  python -m brnpa_jax.predict --exported model.jaxexport --images photos/ --out preds/

``--images`` is a folder (searched recursively for image files, which are
read as training folders read them, ``brnpa_jax.data.image_files``, then
resized and centre-cropped exactly as the evaluation pipeline does) or a
split of the run's dataset (e.g. ``test`` or ``validation[:200]``). The
model restored is the run's best checkpoint, else its latest, built from the
workdir's ``config.json`` (``brnpa_jax.runs.load_run``). With ``--exported``
the artifact of ``brnpa_jax.export`` runs instead of the model code.

Files are decoded and resized in parallel (``--workers`` at once; 0 follows
the machine), a few batches ahead of the model
(``brnpa_jax.data.inference_pipeline``). The model runs data-parallel on
every local device (the batch split over them, the weights replicated:
``brnpa_jax.train.inference.compile_inference``), without waiting for a batch
before the next is sent (``brnpa_jax.train.inference``), and overlays are
drawn on a writer thread meanwhile. ``--batch`` images go to each device
per step, so every device runs the program one device would run: the
outputs are those of one device, bit for bit, whatever the number of
devices or workers. (XLA's float rounding on a CPU can depend on the batch
shape, and on how many devices a process was started with: other
``--batch`` values may differ in the last bits.) Batches have a fixed shape
(the last one is padded), so the function is compiled once.

With ``--multiprocess`` (as ``train.py``: ``jax.distributed.initialize()``
first), each process predicts a contiguous part of the files (or of the
split) on its own devices, and process 0 writes every output, in order.

Written to ``--out`` (a folder):

- ``predictions.csv``: file, label (splits only), then class and probability
  of the top-k predictions; a file is named by its path under ``--images``,
  with bytes that are not UTF-8 as ``\xNN`` escapes (as in ``maps.npz``);
- ``maps.npz``: ``files``, ``probs`` (N, classes), ``maps`` (N, K, h, w) in
  rank order, ``norms`` (N, h, w), ``topk_classes``, ``topk_probs`` and, for
  splits, ``labels``;
- with ``--overlays``: ``overlays/<file>.png``, the ranked maps over each
  image with each rank's share of the norm.

The set is built in a hidden folder beside ``--out`` and swapped in whole
when complete (``brnpa_jax.outputs``): a failed or interrupted run leaves
earlier results in ``--out`` as they were, and two runs into one ``--out``
do not mix (the last to finish wins). ``--out`` is checked before the model
is restored: it must be new, empty, or hold only these outputs (a folder
with other files is refused, never emptied), and its parent folder must be
writable.

Throughput (images/s end to end, with decoding and writing) is printed, with
the time the loop waited for its inputs and for the model: the slower side.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import flags

from brnpa_jax import cli, outputs
from brnpa_jax.data import image_files
from brnpa_jax.errors import ConfigError, InputNotFoundError, UserError
from brnpa_jax.explain.overlay import save_overlay_grid
from brnpa_jax.artifact import load_exported
from brnpa_jax.models.classifier import INFERENCE_OUTPUTS, make_infer_fn
from brnpa_jax.runs import RestoredRun, Workdir, load_run
from brnpa_jax.train import sharding as shd
from brnpa_jax.train.inference import (Predictions, compile_inference, gather,
                                       predict, shard)

__all__ = ["Predictions", "predict", "folder_batches", "split_batches",
           "run_predict", "write_outputs", "main"]

IMAGE_EXTENSIONS = image_files.IMAGE_EXTENSIONS
ON_CORRUPT = image_files.ON_CORRUPT
OUTPUT_KEYS = INFERENCE_OUTPUTS
OUTPUT_FILES = ("predictions.csv", "maps.npz", "overlays")  # what --out holds


# -- inputs ----------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
  """Image files under ``folder`` (``image_files.list_images``): relative
  paths, sorted."""
  found = image_files.list_images(folder)
  if not found:
    raise InputNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"under {folder}.")
  return sorted(found)


def folder_batches(folder: str, size: int, resize_ratio: float, batch: int,
                   on_corrupt: str = "error", resize_mode: str = "short_side",
                   max_pixels: int = image_files.MAX_PIXELS, workers: int = 0,
                   names: Sequence[str] | None = None
                   ) -> Iterator[tuple[list[str], np.ndarray, None]]:
  """``(files, images (batch, S, S, 3), None)``; the last batch zero-padded.

  ``files`` are ``image_files.display_name`` of the paths under ``folder``
  (all of them, or ``names``), decoded ``workers`` at once
  (``inference_pipeline.batches``). A file that cannot be read (truncated,
  not an image, over ``max_pixels``) is an error naming it, or with
  ``on_corrupt='skip'`` a warning, and the file is left out.
  """
  if on_corrupt not in ON_CORRUPT:
    raise ConfigError(f"--on_corrupt={on_corrupt!r}: use one of {ON_CORRUPT}.")
  from brnpa_jax.data import inference_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow
  return inference_pipeline.batches(
      folder, list_images(folder) if names is None else names, size=size,
      resize_ratio=resize_ratio, batch=batch, on_corrupt=on_corrupt,
      resize_mode=resize_mode, max_pixels=max_pixels, workers=workers)


def split_batches(data_cfg, split: str, batch: int, process_index: int = 0,
                  process_count: int = 1
                  ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
  """``(ids, images, labels)`` of (this process's part of) a split of the
  run's dataset, padded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from brnpa_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  try:
    input_pipeline.num_examples(data_cfg, split)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # tfds: unknown split
    raise ConfigError(
        f"--images {split!r} is neither a folder nor a split of the run's "
        f"dataset {data_cfg.name!r} (its splits: train, validation, test, "
        "trainval, or a TFDS slice such as test[:100]).") from e
  ds = input_pipeline.make_eval_dataset(data_cfg, split, batch_size=batch,
                                       process_index=process_index,
                                       process_count=process_count)
  for ex in tfds.as_numpy(ds):
    real = ex["mask"] > 0
    names = [f"{split.split('[')[0]}:{i}" for i in ex["id"][real]]
    yield names, ex["image"], ex["label"][real]


# -- outputs ---------------------------------------------------------------------
def top_k(probs_NxC: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """``(classes (N, k), probs (N, k))``, highest first (ties: lower class)."""
  k = min(k, probs_NxC.shape[1])
  order = np.argsort(-probs_NxC, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(probs_NxC, order, axis=1)


def overlay_path(out: str, name: str) -> str:
  """``out/overlays/<name with '.' and ':' as '_'>.png``: one file per input
  (``rgb.png`` and ``rgb.jpg`` give ``rgb_png.png`` and ``rgb_jpg.png``)."""
  return os.path.join(out, "overlays", name.replace(":", "_").replace(".", "_")
                      + ".png")


def _namer(class_names: Sequence[str] | None) -> Callable:
  return ((lambda c: class_names[int(c)]) if class_names is not None
          else (lambda c: int(c)))


def write_overlays(out: str, names: Sequence[str], probs_NxC: np.ndarray,
                   maps: np.ndarray, norms: np.ndarray, images: Sequence[np.ndarray],
                   class_names: Sequence[str] | None = None) -> None:
  """``overlays/<name>.png`` of some inputs (``overlay_path``), titled with
  the top prediction."""
  classes, probs = top_k(probs_NxC, 1)
  named = _namer(class_names)
  for i, name in enumerate(names):
    title = f"pred {named(classes[i, 0])} ({probs[i, 0]:.0%})"
    save_overlay_grid(overlay_path(out, name), images[i][None], maps[i:i + 1],
                      norms[i:i + 1], [title])


def write_outputs(out: str, preds: Predictions, topk: int,
                  class_names: Sequence[str] | None = None) -> dict[str, str]:
  """Writes ``predictions.csv``, ``maps.npz`` and, when ``preds`` kept its
  images, the overlays; returns paths.

  With ``class_names`` the CSV and the overlays name the classes (the
  indices stay in ``maps.npz``); without, they show the indices.
  """
  os.makedirs(out, exist_ok=True)
  classes, probs = top_k(preds.outputs["probs"], topk)
  named = _namer(class_names)
  csv_path = os.path.join(out, "predictions.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    has_labels = preds.labels is not None
    w.writerow(["file"] + (["label"] if has_labels else []) + [
        f"{kind}_{r + 1}" for r in range(classes.shape[1])
        for kind in ("class", "prob")])
    for i, name in enumerate(preds.files):
      row = [name] + ([named(preds.labels[i])] if has_labels else [])
      for c, p in zip(classes[i], probs[i]):
        row += [named(c), f"{p:.6f}"]
      w.writerow(row)
  npz_path = os.path.join(out, "maps.npz")
  extra = {} if preds.labels is None else {"labels": preds.labels}
  if class_names is not None:
    extra["class_names"] = np.array(class_names)
  np.savez_compressed(npz_path, files=np.array(preds.files), topk_classes=classes,
                      topk_probs=probs, **preds.outputs, **extra)
  paths = {"csv": csv_path, "npz": npz_path}
  if preds.images is not None:
    write_overlays(out, preds.files, preds.outputs["probs"],
                   preds.outputs["maps"], preds.outputs["norms"], preds.images,
                   class_names)
  return paths


def compile_model(run: RestoredRun, mesh=None) -> Callable:
  """``images -> compiled inference`` of a restored run, data-parallel over
  ``mesh`` (default: every local device)."""
  mesh = mesh or shd.make_mesh(devices=jax.local_devices())
  infer = make_infer_fn(run.model)
  return lambda images: compile_inference(infer, run.variables, images.shape,
                                          mesh)


def _looks_like_a_path(images: str) -> bool:
  return (os.sep in images or os.path.exists(images)
          or images.lower().endswith(IMAGE_EXTENSIONS))


def run_predict(*, images: str, out: str, workdir: str | None = None,
                exported: str | None = None, checkpoint: str = "auto",
                batch: int = 64, topk: int = 5, overlays: bool = False,
                on_corrupt: str = "error", verbose: bool = True,
                max_pixels: int = image_files.MAX_PIXELS, workers: int = 0,
                devices: Sequence[jax.Device] | None = None) -> Predictions:
  """Restores a run (or loads an artifact), predicts, writes the outputs.

  Args:
    images: an image folder, or a split of the run's dataset.
    out: output folder (replaced as a whole; see the module docstring).
    workdir: training workdir (needed unless ``exported``; with ``exported``
      only for a dataset split, whose data config it holds).
    exported: path of a ``brnpa_jax.export`` artifact to run instead.
    checkpoint: ``auto`` (best, else latest), ``best`` or ``latest``.
    batch: images per device per step (a fixed shape: the last batch is
      padded).
    topk: predictions per image in the CSV.
    overlays: also write one PNG of the ranked maps per image.
    on_corrupt: ``error`` (default) or ``skip`` an image that does not decode.
    verbose: print the throughput and what was written.
    max_pixels: larger images are corrupt (read from the header).
    workers: files decoded at once; 0 follows the machine.
    devices: this process's devices to run on (default: all local ones).

  Returns:
    The ``Predictions`` (outputs in input order, padding removed; under
    several processes, every process's).
  """
  t_start = time.perf_counter()
  if batch < 1 or topk < 1 or workers < 0:
    raise ConfigError(f"--batch and --topk must be >= 1 and --workers >= 0, got "
                      f"{batch}, {topk} and {workers}.")
  is_folder = os.path.isdir(images)
  if not is_folder and _looks_like_a_path(images):
    raise ConfigError(f"--images {images}: no such folder (give a folder of "
                      "images, or a split of the run's dataset such as test).")
  if not (exported or workdir):
    raise ConfigError("pass --workdir (a training run) or --exported (an "
                      "artifact).")
  devices = list(devices or jax.local_devices())
  per_device, batch = batch, batch * len(devices)
  index, count = jax.process_index(), jax.process_count()
  writes = index == 0  # process 0 writes every output
  with (outputs.replace_folder(out, OUTPUT_FILES) if writes
        else contextlib.nullcontext(None)) as staging:
    if exported:
      artifact = load_exported(exported)
      size, ratio = artifact.meta["image_size"], artifact.meta["resize_ratio"]
      mode = artifact.meta.get("resize", "short_side")
      compile_fn = lambda images: artifact.compile(images, devices)
      class_names = artifact.meta.get("class_names")
      data_cfg = None
      if not is_folder:
        if not workdir:
          raise ConfigError(f"{images!r} is not a folder, so it is read as a "
                            "dataset split, which needs --workdir for the data.")
        data_cfg = Workdir(workdir).read_config().data
    else:
      run = load_run(workdir, checkpoint=checkpoint)
      data_cfg, class_names = run.config.data, run.class_names
      size, ratio = data_cfg.image_size, data_cfg.resize_ratio
      mode = data_cfg.get("resize", "short_side")
      compile_fn = compile_model(run, shd.make_mesh(devices=devices))
    if is_folder:
      names = shard(list_images(images), index, count)
      batches = folder_batches(images, size, ratio, batch, on_corrupt, mode,
                               max_pixels, workers, names)
    else:
      batches = split_batches(data_cfg, images, batch, index, count)
    # One process: overlays drawn on the writer thread as batches finish;
    # several: by process 0 once it has every process's images.
    on_batch = None
    if overlays and count == 1:
      def on_batch(start, names, out_batch, shown):
        del start
        with outputs.naming(out):
          write_overlays(staging, names, out_batch["probs"], out_batch["maps"],
                         out_batch["norms"], shown, class_names)
    preds = _predict_here(batches, compile_fn, keep_images=overlays,
                          on_batch=on_batch, count=count)
    if writes:
      written = preds if on_batch is None else dataclasses.replace(
          preds, images=None)
      with outputs.naming(out):
        paths = write_outputs(staging, written, topk, class_names)
      if overlays:
        paths["overlays"] = os.path.join(staging, "overlays")
  preds.total_seconds = time.perf_counter() - t_start
  if verbose and writes:
    paths = outputs.moved(paths, staging, out)
    n = len(preds.files)
    print(f"{n} images: end to end {n / preds.total_seconds:.1f} images/s "
          f"(batch {per_device} on each of {len(devices)} device(s) x {count} "
          f"process(es); "
          f"compile {preds.compile_seconds:.1f} s; waited "
          f"{preds.input_seconds:.1f} s for inputs, {preds.model_seconds:.1f} s "
          "for the model). Wrote " + ", ".join(paths.values()) + ".")
    if preds.labels is not None:
      acc = float(np.mean(preds.outputs["probs"].argmax(1) == preds.labels))
      print(f"top-1 accuracy {acc:.4f}")
  return preds


def _predict_here(batches, compile_fn, *, keep_images, on_batch, count):
  """``predict``; under several processes, then ``gather``."""
  if count == 1:
    return predict(batches, compile_fn, keep_images=keep_images,
                   on_batch=on_batch)
  return gather(predict(batches, compile_fn, keep_images=keep_images,
                        allow_empty=True))


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  cli.define_run_flags(fv)
  cli.define_multiprocess_flags(fv)
  flags.DEFINE_string("images", None, "An image folder, or a split of the run's "
                      "dataset (e.g. test or validation[:200]).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_string("exported", None, "Run this brnpa_jax.export artifact "
                      "instead of the model code.", flag_values=fv)
  flags.DEFINE_integer("batch", 64, "Images per device per step (a fixed "
                       "shape: the last batch is padded).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("topk", 5, "Predictions per image in the CSV.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("overlays", False, "Also write one PNG of the ranked maps "
                    "per image.", flag_values=fv)
  flags.DEFINE_enum("on_corrupt", "error", list(ON_CORRUPT), "An image that does "
                    "not decode: stop (error) or warn and leave it out (skip).",
                    flag_values=fv)
  flags.DEFINE_integer("max_pixels", image_files.MAX_PIXELS, "An image with "
                       "more pixels is treated as corrupt (a decompression "
                       "bomb); see --on_corrupt.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("workers", 0, "Image files decoded at once; 0 follows "
                       "the machine (tf.data's autotuning).", lower_bound=0,
                       flag_values=fv)
  flags.mark_flags_as_required(["images", "out"], flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  if fv.exported is None and fv.workdir is None:
    raise ConfigError("pass --workdir (a training run) or --exported (an artifact).")
  cli.start_jax(fv)  # after jax.distributed.initialize under --multiprocess
  run_predict(images=fv.images, out=fv.out, workdir=fv.workdir,
              exported=fv.exported, checkpoint=fv.checkpoint, batch=fv.batch,
              topk=fv.topk, overlays=fv.overlays, on_corrupt=fv.on_corrupt,
              max_pixels=fv.max_pixels, workers=fv.workers)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; see the module docstring."""
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.predict", start_jax=False)


if __name__ == "__main__":
  raise SystemExit(main())
