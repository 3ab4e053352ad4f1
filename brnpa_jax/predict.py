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

Batches have a fixed shape (``--batch``; the last one is padded), so the
function is compiled once. Written to ``--out`` (a folder):

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

Throughput (images/s of the compiled model, and end to end with decoding and
writing) is printed.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import flags

from brnpa_jax import cli, outputs
from brnpa_jax.data import image_files
from brnpa_jax.data.normalization import denormalize
from brnpa_jax.errors import ConfigError, InputNotFoundError, UserError
from brnpa_jax.explain.overlay import save_overlay_grid
from brnpa_jax.artifact import load_exported
from brnpa_jax.models.classifier import INFERENCE_OUTPUTS, make_infer_fn
from brnpa_jax.runs import RestoredRun, Workdir, load_run

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


def _eval_transform_fn(size: int, resize_ratio: float, resize_mode: str):
  """The evaluation pipeline's transform as one compiled TF function."""
  from brnpa_jax.data import transforms  # pylint: disable=g-import-not-at-top
  tf = transforms.tf

  @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  def transform(image):
    return transforms.eval_transform(image, {}, size=size,
                                     resize_ratio=resize_ratio,
                                     resize_mode=resize_mode)[0]

  return lambda image: transform(image).numpy()


def folder_batches(folder: str, size: int, resize_ratio: float, batch: int,
                   on_corrupt: str = "error", resize_mode: str = "short_side",
                   max_pixels: int = image_files.MAX_PIXELS
                   ) -> Iterator[tuple[list[str], np.ndarray, None]]:
  """``(files, images (batch, S, S, 3), None)``; the last batch zero-padded.

  ``files`` are ``image_files.display_name`` of the paths under ``folder``.
  A file that cannot be read (truncated, not an image, over ``max_pixels``)
  is an error naming it, or with ``on_corrupt='skip'`` a warning, and the
  file is left out.
  """
  if on_corrupt not in ON_CORRUPT:
    raise ConfigError(f"--on_corrupt={on_corrupt!r}: use one of {ON_CORRUPT}.")
  transform = _eval_transform_fn(size, resize_ratio, resize_mode)
  names, images = [], np.zeros((batch, size, size, 3), np.float32)
  # The warnings wait for the first readable image: a folder where none is
  # readable is one error, not a warning per file before it.
  skipped, read_one = [], False
  for name in list_images(folder):
    path = os.path.join(folder, name)
    try:
      pixels = image_files.read_image(path, max_pixels=max_pixels)
    except image_files.CorruptImageError as e:
      if on_corrupt == "error":
        raise ConfigError(f"cannot decode {e}; fix or remove it, or pass "
                          "--on_corrupt=skip.") from e
      skipped.append(f"Warning: skipped {e}")
      if read_one:
        print(skipped.pop(), file=sys.stderr, flush=True)
      continue
    if not read_one:
      read_one = True
      for line in skipped:
        print(line, file=sys.stderr, flush=True)
      skipped = []
    images[len(names)] = transform(pixels)
    names.append(image_files.display_name(name))
    if len(names) == batch:
      yield names, images, None
      names, images = [], np.zeros((batch, size, size, 3), np.float32)
  if names:
    yield names, images, None
  if not read_one:
    raise ConfigError(
        f"no image under {image_files.message_name(folder)} could be read: "
        f"{len(skipped)} skipped (the first: "
        f"{skipped[0].removeprefix('Warning: skipped ')}).")


def split_batches(data_cfg, split: str, batch: int
                  ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
  """``(ids, images, labels)`` of a split of the run's dataset, padded."""
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
  ds = input_pipeline.make_eval_dataset(data_cfg, split, batch_size=batch)
  for ex in tfds.as_numpy(ds):
    real = ex["mask"] > 0
    names = [f"{split.split('[')[0]}:{i}" for i in ex["id"][real]]
    yield names, ex["image"], ex["label"][real]


# -- inference -------------------------------------------------------------------
@dataclasses.dataclass
class Predictions:
  """Outputs of ``predict`` over all inputs, padding removed."""
  files: list[str]
  labels: np.ndarray | None
  outputs: dict[str, np.ndarray]      # probs, maps, norms
  model_seconds: float                # compiled calls only
  compile_seconds: float
  total_seconds: float
  images: list[np.ndarray] | None = None  # uint8, kept for overlays


def predict(batches: Iterator, compile_fn: Callable, *,
            keep_images: bool = False) -> Predictions:
  """Runs the compiled inference on every batch (one shape, one compile).

  Args:
    batches: ``(names, images (batch, S, S, 3), labels | None)`` iterator.
    compile_fn: ``images -> compiled (images -> {'probs', 'maps', 'norms'})``,
      called on the first batch and timed apart from the run.
    keep_images: keep the display images (for overlays).
  """
  t_start = time.perf_counter()
  files, labels, chunks, shown = [], [], [], []
  model_s = compile_s = 0.0
  compiled = None
  for names, images, batch_labels in batches:
    if compiled is None:
      t = time.perf_counter()
      compiled = compile_fn(images)
      compile_s = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(images))
    model_s += time.perf_counter() - t
    n = len(names)
    chunks.append({k: np.asarray(out[k])[:n] for k in OUTPUT_KEYS})
    files += names
    if batch_labels is not None:
      labels.append(batch_labels)
    if keep_images:
      shown += list(denormalize(images[:n]))
  if not files:
    raise ConfigError("no inputs to predict on (every image was skipped).")
  outputs = {k: np.concatenate([c[k] for c in chunks]) for k in OUTPUT_KEYS}
  bad = ~np.all([np.isfinite(v.reshape(len(files), -1)).all(1)
                 for v in outputs.values()], axis=0)
  if bad.any():  # written as they are, but never silently
    print(f"Warning: the outputs of {bad.sum()} of {len(files)} inputs hold "
          "NaN or Inf: the model's weights are likely not finite.",
          file=sys.stderr, flush=True)
  return Predictions(files, np.concatenate(labels) if labels else None, outputs,
                     model_s, compile_s, time.perf_counter() - t_start,
                     shown if keep_images else None)


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


def write_outputs(out: str, preds: Predictions, topk: int,
                  class_names: Sequence[str] | None = None) -> dict[str, str]:
  """Writes ``predictions.csv``, ``maps.npz`` and overlays; returns paths.

  With ``class_names`` the CSV and the overlays name the classes (the
  indices stay in ``maps.npz``); without, they show the indices.
  """
  os.makedirs(out, exist_ok=True)
  classes, probs = top_k(preds.outputs["probs"], topk)
  named = ((lambda c: class_names[int(c)]) if class_names is not None
           else (lambda c: int(c)))
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
    for i, name in enumerate(preds.files):
      title = f"pred {named(classes[i, 0])} ({probs[i, 0]:.0%})"
      save_overlay_grid(overlay_path(out, name), preds.images[i][None],
                        preds.outputs["maps"][i:i + 1],
                        preds.outputs["norms"][i:i + 1], [title])
    paths["overlays"] = os.path.join(out, "overlays")
  return paths


def compile_model(run: RestoredRun) -> Callable:
  """``images -> compiled inference`` of a restored run (variables as inputs)."""
  infer = jax.jit(make_infer_fn(run.model))

  def compile_fn(images):
    compiled = infer.lower(run.variables, images).compile()
    return lambda x: compiled(run.variables, x)

  return compile_fn


def _looks_like_a_path(images: str) -> bool:
  return (os.sep in images or os.path.exists(images)
          or images.lower().endswith(IMAGE_EXTENSIONS))


def run_predict(*, images: str, out: str, workdir: str | None = None,
                exported: str | None = None, checkpoint: str = "auto",
                batch: int = 64, topk: int = 5, overlays: bool = False,
                on_corrupt: str = "error", verbose: bool = True,
                max_pixels: int = image_files.MAX_PIXELS) -> Predictions:
  """Restores a run (or loads an artifact), predicts, writes the outputs.

  Args:
    images: an image folder, or a split of the run's dataset.
    out: output folder (replaced as a whole; see the module docstring).
    workdir: training workdir (needed unless ``exported``; with ``exported``
      only for a dataset split, whose data config it holds).
    exported: path of a ``brnpa_jax.export`` artifact to run instead.
    checkpoint: ``auto`` (best, else latest), ``best`` or ``latest``.
    batch: fixed batch size (the last batch is padded).
    topk: predictions per image in the CSV.
    overlays: also write one PNG of the ranked maps per image.
    on_corrupt: ``error`` (default) or ``skip`` an image that does not decode.
    verbose: print the throughput and what was written.
    max_pixels: larger images are corrupt (read from the header).

  Returns:
    The ``Predictions`` (outputs in input order, padding removed).
  """
  t_start = time.perf_counter()
  if batch < 1 or topk < 1:
    raise ConfigError(f"--batch and --topk must be >= 1, got {batch} and {topk}.")
  is_folder = os.path.isdir(images)
  if not is_folder and _looks_like_a_path(images):
    raise ConfigError(f"--images {images}: no such folder (give a folder of "
                      "images, or a split of the run's dataset such as test).")
  if not (exported or workdir):
    raise ConfigError("pass --workdir (a training run) or --exported (an "
                      "artifact).")
  with outputs.replace_folder(out, OUTPUT_FILES) as staging:
    if exported:
      artifact = load_exported(exported)
      size, ratio = artifact.meta["image_size"], artifact.meta["resize_ratio"]
      mode = artifact.meta.get("resize", "short_side")
      compile_fn = artifact.compile
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
      compile_fn = compile_model(run)
    batches = (folder_batches(images, size, ratio, batch, on_corrupt, mode,
                              max_pixels)
               if is_folder
               else split_batches(data_cfg, images, batch))
    preds = predict(batches, compile_fn, keep_images=overlays)
    with outputs.naming(out):
      paths = write_outputs(staging, preds, topk, class_names)
  paths = outputs.moved(paths, staging, out)
  preds.total_seconds = time.perf_counter() - t_start
  if verbose:
    n = len(preds.files)
    print(f"{n} images: model {n / max(preds.model_seconds, 1e-9):.1f} images/s "
          f"(batch {batch}; compile {preds.compile_seconds:.1f} s), end to end "
          f"{n / preds.total_seconds:.1f} images/s. Wrote "
          + ", ".join(paths.values()) + ".")
    if preds.labels is not None:
      acc = float(np.mean(preds.outputs["probs"].argmax(1) == preds.labels))
      print(f"top-1 accuracy {acc:.4f}")
  return preds


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  cli.define_run_flags(fv)
  flags.DEFINE_string("images", None, "An image folder, or a split of the run's "
                      "dataset (e.g. test or validation[:200]).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_string("exported", None, "Run this brnpa_jax.export artifact "
                      "instead of the model code.", flag_values=fv)
  flags.DEFINE_integer("batch", 64, "Fixed batch size (the last batch is padded).",
                       lower_bound=1, flag_values=fv)
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
  flags.mark_flags_as_required(["images", "out"], flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  if fv.exported is None and fv.workdir is None:
    raise ConfigError("pass --workdir (a training run) or --exported (an artifact).")
  run_predict(images=fv.images, out=fv.out, workdir=fv.workdir,
              exported=fv.exported, checkpoint=fv.checkpoint, batch=fv.batch,
              topk=fv.topk, overlays=fv.overlays, on_corrupt=fv.on_corrupt,
              max_pixels=fv.max_pixels)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line; see the module docstring."""
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.predict")


if __name__ == "__main__":
  raise SystemExit(main())
