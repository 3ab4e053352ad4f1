r"""Batch inference at the model's rate: ``predict``'s parts and the whole, side by side.

  python -m benchmarks.predict                 # both configs, ~10 minutes on 2 cores
  python -m benchmarks.predict --configs default64 --images 512
  python -m benchmarks.predict --smoke         # tiny sizes: the code paths only

On one folder of generated JPEGs (500 x 375, like CUB's photos; smooth
colour fields with noise, so they compress and decode like photos), for
each config, in one process:

- *model*: the compiled inference alone, data-parallel over this process's
  devices, on device-resident images (``train.inference.compile_inference``);
- *pipeline*: the file pipeline alone (``predict.folder_batches``: decode,
  resize, centre-crop, in parallel);
- *end to end*: ``predict``'s loop (pipeline, model, outputs fetched, CSV
  and npz written), compilation excluded;
- *serial*: the loop ``predict`` ran before it was parallel (kept below,
  ``serial_batches`` and ``serial_predict``): each file decoded with Pillow,
  then resized by one compiled TF function call, the model called on one
  device and waited for, batch after batch;

then the ratios end to end / min(model, pipeline) and end to end / serial.
The model alone and end to end are measured again in a subprocess with the
other device count (1 or 8 fake CPU devices, ``XLA_FLAGS``). Configs:
``default64`` (the default model: ResNet-18 width 16 + BR-NPA K=3, high
resolution, 64 px) and ``resnet50_224`` (ResNet-50 + BR-NPA, low
resolution, 224 px). Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import jax
import numpy as np
from PIL import Image

from brnpa_jax import predict
from brnpa_jax.explain.overlay import save_overlay_grid
from brnpa_jax.models import build_model
from brnpa_jax.models.classifier import INFERENCE_OUTPUTS, make_infer_fn
from brnpa_jax.train import sharding as shd
from brnpa_jax.train.inference import compile_inference
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name: (config switches, image size, share of --images)
    "default64": ("", 64, 1),
    "resnet50_224": ("backbone=resnet50,res=low,width=64", 224, 4),
    "tiny32": ("runlocal", 32, 1),  # --smoke
}


# -- the serial loop predict ran before (kept here to compare with) --------------------
def serial_batches(folder, size, resize_ratio, batch, resize_mode="short_side"):
  """Yesterday's ``predict.folder_batches``: one file at a time."""
  from brnpa_jax.data import image_files, transforms  # pylint: disable=g-import-not-at-top
  tf = transforms.tf

  @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  def transform(image):
    return transforms.eval_transform(image, {}, size=size,
                                     resize_ratio=resize_ratio,
                                     resize_mode=resize_mode)[0]

  names, images = [], np.zeros((batch, size, size, 3), np.float32)
  for name in predict.list_images(folder):
    pixels = image_files.read_image(os.path.join(folder, name))
    images[len(names)] = transform(pixels).numpy()
    names.append(image_files.display_name(name))
    if len(names) == batch:
      yield names, images, None
      names, images = [], np.zeros((batch, size, size, 3), np.float32)
  if names:
    yield names, images, None


def serial_predict(batches, model, variables, *, keep_images=False,
                   compiled=None):
  """Yesterday's ``predict.predict`` on one device: ``(files, outputs,
  images, seconds without compiling)``; ``compiled``: the model compiled
  for the batch already."""
  from brnpa_jax.data.normalization import denormalize  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  files, chunks, shown, compile_s = [], [], [], 0.0
  infer = jax.jit(make_infer_fn(model))
  for names, images, _ in batches:
    if compiled is None:
      t = time.perf_counter()
      compiled = infer.lower(variables, images).compile()
      compile_s = time.perf_counter() - t
    out = jax.block_until_ready(compiled(variables, images))
    chunks.append({k: np.asarray(out[k])[:len(names)] for k in INFERENCE_OUTPUTS})
    files += names
    if keep_images:
      shown += list(denormalize(images[:len(names)]))
  outputs = {k: np.concatenate([c[k] for c in chunks]) for k in INFERENCE_OUTPUTS}
  return files, outputs, shown or None, time.perf_counter() - t0 - compile_s


def serial_write_outputs(out, preds, topk, class_names=None):
  """Yesterday's ``predict.write_outputs``: CSV, npz, then every overlay."""
  os.makedirs(out, exist_ok=True)
  classes, probs = predict.top_k(preds.outputs["probs"], topk)
  named = ((lambda c: class_names[int(c)]) if class_names is not None
           else (lambda c: int(c)))
  with open(os.path.join(out, "predictions.csv"), "w", newline="") as f:
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
  extra = {} if preds.labels is None else {"labels": preds.labels}
  if class_names is not None:
    extra["class_names"] = np.array(class_names)
  np.savez_compressed(os.path.join(out, "maps.npz"), files=np.array(preds.files),
                      topk_classes=classes, topk_probs=probs, **preds.outputs,
                      **extra)
  if preds.images is not None:
    for i, name in enumerate(preds.files):
      title = f"pred {named(classes[i, 0])} ({probs[i, 0]:.0%})"
      save_overlay_grid(predict.overlay_path(out, name), preds.images[i][None],
                        preds.outputs["maps"][i:i + 1],
                        preds.outputs["norms"][i:i + 1], [title])


# -- inputs -------------------------------------------------------------------------------
def make_folder(folder: str, count: int, hw=(375, 500), seed: int = 0) -> str:
  """``count`` JPEGs (quality 90) of smooth colour fields with noise."""
  os.makedirs(folder, exist_ok=True)
  if folder_files(folder) >= count:
    return folder
  rng = np.random.default_rng(seed)
  h, w = hw
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  for i in range(count):
    f = rng.uniform(1, 6, (3, 2))
    phase = rng.uniform(0, 6.3, 3)
    field = np.stack([np.sin(f[c, 0] * 6 * yy + f[c, 1] * 6 * xx + phase[c])
                      for c in range(3)], -1)
    pixels = np.clip(127 + 90 * field + rng.normal(0, 12, (h, w, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(
        os.path.join(folder, f"img{i:05d}.jpg"), quality=90)
  return folder


def make_run(name: str):
  """``(run-like (model, variables), data config)`` of a config, random weights."""
  switches, size, _ = CONFIGS[name]
  config = default.get_config(switches or None)
  with config.unlocked():
    config.data.image_size = size
  model = build_model(config.model, config.data.parts.num_classes, config.dtype)
  variables = jax.jit(lambda: model.init(
      jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False))()
  variables = {"params": variables["params"],
               "batch_stats": variables.get("batch_stats", {})}
  return types.SimpleNamespace(model=model, variables=variables), config.data


# -- measurements -------------------------------------------------------------------------
def model_rate(f, size: int, batch: int, iters: int) -> float:
  """Images/s of the compiled inference ``f`` on device-resident images."""
  mesh = shd.make_mesh(devices=jax.local_devices())
  x = jax.device_put(np.random.default_rng(0).standard_normal(
      (batch, size, size, 3), np.float32), shd.data_sharding(mesh))
  jax.block_until_ready(f(x))
  t = time.perf_counter()
  outs = [f(x) for _ in range(iters)]
  jax.block_until_ready(outs)
  return iters * batch / (time.perf_counter() - t)


def pipeline_rate(folder: str, data, batch: int) -> float:
  t, n = time.perf_counter(), 0
  for names, _, _ in predict.folder_batches(folder, data.image_size,
                                            data.resize_ratio, batch):
    n += len(names)
  return n / (time.perf_counter() - t)


def end_to_end_rate(folder: str, f, data, batch: int) -> float:
  """``predict``'s loop and writing (CSV, npz) around the compiled ``f``
  (``predict.compile_model``'s program)."""
  with tempfile.TemporaryDirectory() as out:
    # predict's --batch is per device; ``batch`` here is the whole step's.
    preds = predict.predict(
        predict.folder_batches(folder, data.image_size, data.resize_ratio, batch),
        lambda _: f)
    t = time.perf_counter()
    predict.write_outputs(out, preds, 5)
    seconds = preds.total_seconds - preds.compile_seconds + time.perf_counter() - t
  return len(preds.files) / seconds


def serial_rate(folder: str, run, data, batch: int, compiled) -> float:
  files, _, _, seconds = serial_predict(
      serial_batches(folder, data.image_size, data.resize_ratio, batch),
      run.model, run.variables, compiled=compiled)
  return len(files) / seconds


def warm_up(folder: str) -> None:
  """TensorFlow imported, tf.data started and the transform traced once,
  outside every timing (a later run of the tool traces again, in ~0.3 s)."""
  list(predict.folder_batches(folder, 32, 0.875, 2, names=["img00000.jpg"]))


def folder_of(base: str, name: str, images: int) -> str:
  """The config's folder: ``images / share`` JPEGs (a slower model reads
  fewer)."""
  count = max(1, images // CONFIGS[name][2])
  return make_folder(os.path.join(base, str(count)), count)


def folder_files(folder: str) -> int:
  return len([n for n in os.listdir(folder) if n.endswith(".jpg")])


def measure(name: str, base: str, images: int, batch: int, parts,
            rounds: int) -> dict:
  """The best of ``rounds`` interleaved rounds of each part (the machine is
  shared: the best is the least disturbed). Each part handles as many
  images (the model alone: as many batches); the programs are compiled
  once, before."""
  run, data = make_run(name)
  folder = folder_of(base, name, images)
  count, size = folder_files(folder), data.image_size
  row = {"config": name, "devices": jax.local_device_count(), "batch": batch,
         "images": count}
  mesh = shd.make_mesh(devices=jax.local_devices())
  f = compile_inference(make_infer_fn(run.model), run.variables,
                        (batch, size, size, 3), mesh)
  if "serial" in parts:
    one = jax.jit(make_infer_fn(run.model)).lower(
        run.variables, jax.ShapeDtypeStruct((batch, size, size, 3),
                                            np.float32)).compile()
  for _ in range(rounds):
    rates = {}
    if "model" in parts:
      rates["model"] = model_rate(f, size, batch, max(1, -(-count // batch)))
    if "pipeline" in parts:
      rates["pipeline"] = pipeline_rate(folder, data, batch)
    if "end_to_end" in parts:
      rates["end_to_end"] = end_to_end_rate(folder, f, data, batch)
    if "serial" in parts:
      rates["serial"] = serial_rate(folder, run, data, batch, one)
    for k, v in rates.items():
      row[k] = max(row.get(k, 0.0), v)
  return row


def other_devices(args, count: int) -> list[dict]:
  """``measure`` (model, end to end) in a subprocess with ``count`` devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "benchmarks.predict", "--child", "--folder",
         args.folder, "--configs", ",".join(args.configs), "--batch",
         str(args.batch), "--images",
         str(args.images), "--rounds", str(args.rounds)]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"the {count}-device run failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  lines = ["| config | devices | images | model img/s | pipeline img/s | end to end img/s "
           "| serial img/s | e2e / min(model, pipeline) | e2e / serial |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    fmt = lambda k: f"{r[k]:.1f}" if k in r else ""
    bound = min(r.get("model", np.inf), r.get("pipeline", np.inf))
    ratio = (f"**{r['end_to_end'] / bound:.2f}**" if "end_to_end" in r
             and np.isfinite(bound) else "")
    vs = (f"{r['end_to_end'] / r['serial']:.1f}x" if "serial" in r and
          "end_to_end" in r else "")
    lines.append(f"| {r['config']} | {r['devices']} | {r['images']} | {fmt('model')} | "
                 f"{fmt('pipeline')} | {fmt('end_to_end')} | {fmt('serial')} | "
                 f"{ratio} | {vs} |")
  return "\n".join(lines)


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="default64,resnet50_224",
                 type=lambda s: s.split(","))
  p.add_argument("--images", type=int, default=0,
                 help="JPEGs in the folder (default 512; --smoke 16)")
  p.add_argument("--batch", type=int, default=0, help="images per step over "
                 "all devices (default 64; --smoke 8)")
  p.add_argument("--folder", default=None, help="where the JPEGs are made "
                 "(kept, reused); default a temporary folder")
  p.add_argument("--rounds", type=int, default=0,
                 help="rounds, best kept (default 3; --smoke 1)")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--no_other_devices", action="store_true",
                 help="skip the subprocess with the other device count")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  small = args.smoke
  args.images = args.images or (16 if small else 512)
  args.batch = args.batch or (8 if small else 64)
  args.rounds = args.rounds or (1 if small else 3)
  if small and args.configs == ["default64", "resnet50_224"]:
    args.configs = ["tiny32"]
  return args


def main(argv=None) -> list[dict]:
  args = parse(argv)
  if args.child:
    warm_up(folder_of(args.folder, args.configs[0], args.images))
    rows = [measure(c, args.folder, args.images, args.batch,
                    ("model", "end_to_end"), args.rounds) for c in args.configs]
    print(json.dumps(rows))
    return rows
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    args.folder = args.folder or os.path.join(tmp, "jpegs")
    warm_up(folder_of(args.folder, args.configs[0], args.images))
    rows = [measure(c, args.folder, args.images, args.batch,
                    ("model", "pipeline", "end_to_end", "serial"), args.rounds)
            for c in args.configs]
    if not args.no_other_devices:
      other = 8 if jax.local_device_count() == 1 else 1
      for row in other_devices(args, other):
        # The pipeline does not use the devices: the same rate.
        row["pipeline"] = next(r["pipeline"] for r in rows
                               if r["config"] == row["config"])
        rows.append(row)
  print(f"JPEGs of 500x375 (images column), batch {args.batch} per step; "
        f"{os.cpu_count()} CPUs (load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after), jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}")
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
