"""The JAX side of ``benchmarks.gpu_suite``: one function per kind of job.

Each takes the job (a dict from the suite's plan) and the run's context
(model family, timing counts, the XLA options chosen so far) and returns a
JSON-able dict. Everything is built from random data: no dataset, no
TensorFlow, no ml_collections.
"""

from __future__ import annotations

import platform
import time
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import deletion, fewshot_step, reid_step, train_step, xai
from brnpa_jax.models.classifier import make_infer_fn
from brnpa_jax.train import inference
from brnpa_jax.train import sharding as shd

# XLA options compared on the headline train step (passed per compilation,
# ``Lowered.compile(compiler_options=...)``, so one process measures them
# all); the fastest is kept for every later JAX measurement of the run.
XLA_OPTION_SETS = {
    "default": {},
    "latency-hiding scheduler": {"xla_gpu_enable_latency_hiding_scheduler": True},
    "no command buffers": {"xla_gpu_enable_command_buffer": ""},
}


def probe() -> dict:
  """Versions and the device; imports every module the jobs use."""
  dev = jax.devices()[0]
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count()}


def peaks(job, ctx) -> dict:
  """Measured matmul rates, and the published peaks of this device."""
  kind = jax.devices()[0].device_kind
  out = {"device_kind": kind}
  for dtype in ("bfloat16", "float32"):
    out[f"matmul_{dtype}"] = train_step.matmul_peak_flops(job["n"], ctx["iters"],
                                                          dtype)
    out[f"published_{dtype}"] = train_step.published_peak(kind, dtype)
  return out


def train(job, ctx) -> dict:
  """The train step under each of ``job['option_sets']`` (default: the
  run's chosen options), and inference at the same batch if asked."""
  setting = train_step.JaxSetting(
      job["head"], job["size"], job["res"], job["batch"], job["dtype"],
      remat=job.get("remat"), stage_sizes=ctx["stage_sizes"], width=ctx["width"])
  names = job.get("option_sets") or [ctx["options_name"]]
  # Several sets: medians of 3 interleaved rounds (drift hits all alike).
  rounds = 3 if len(names) > 1 else 1
  out = {"flops": setting.train_flops, "by_options": setting.train_sets(
      {name: XLA_OPTION_SETS[name] for name in names},
      max(1, ctx["iters"] // rounds), ctx["warmup"], rounds)}
  if job.get("infer"):
    out["infer"] = setting.infer(ctx["iters"], ctx["warmup"],
                                 XLA_OPTION_SETS[ctx["options_name"]] or None)
  return out


def deletion_curves(job, ctx) -> dict:
  """Batched vs looped deletion (``benchmarks.deletion``), both protocols."""
  opts = dict(job["opts"], stage_sizes=ctx["stage_sizes"], width=ctx["width"])
  return {"rows": deletion.measure(opts, job["dtype"])}


def fewshot(job, ctx) -> dict:
  """Episodic and pretraining steps of ResNet-12 + BR-NPA."""
  args = types.SimpleNamespace(**job["args"], iters=ctx["iters"],
                               dtype=job["dtype"])
  rows = []
  for phase in job["phases"]:
    for res in job["res"]:
      sec, first = fewshot_step.step_seconds(args, "brnpa", res,
                                             phase == "episodic")
      images = (args.ways * (args.shots + args.queries) if phase == "episodic"
                else args.batch)
      rows.append({"phase": phase, "res": res, "step_s": sec, "first_s": first,
                   "img_s": images / sec, "images": images})
  return {"rows": rows}


def reid(job, ctx) -> dict:
  """The re-id train step (``benchmarks.reid_step``)."""
  r = reid_step.measure(job["res"], job["batch"], ctx["iters"], job["dtype"],
                        job["backbone"], tuple(job["size"]), job.get("width", 0))
  return {k: v for k, v in r.items() if k != "cpu_s"}


def xai_metrics(job, ctx) -> dict:
  """Our Quantus-family metrics (``benchmarks.xai.measure_ours``)."""
  del ctx
  return {"rows": xai.measure_ours(**job["opts"])}


def predict_loop(job, ctx) -> dict:
  """``predict``'s inference on every device: the compiled model alone, on
  device-resident images; fed from host memory by ``predict``'s loop
  (``train.inference``: asynchronous dispatch, copies of the next batch
  overlapping the model, outputs fetched two batches behind); and fed by
  the serial loop it replaced (one device, each batch waited for). No file
  decoding: TensorFlow is absent here (``benchmarks.predict`` measures the
  file pipeline)."""
  model = train_step.build("brnpa", job["res"], job["dtype"],
                           stage_sizes=ctx["stage_sizes"], width=ctx["width"])
  size, per_device = job["size"], job["batch"]
  mesh = shd.make_mesh(devices=jax.local_devices())
  batch = per_device * mesh.size
  variables = train_step.random_state(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)))
  infer = make_infer_fn(model)
  host = [np.random.default_rng(i).standard_normal((batch, size, size, 3),
                                                   np.float32) for i in range(2)]
  steps = max(2, 2 * ctx["iters"])
  t = time.perf_counter()
  run = inference.compile_inference(infer, variables, host[0].shape, mesh)
  compile_s = time.perf_counter() - t
  x = jax.device_put(host[0], shd.data_sharding(mesh))
  jax.block_until_ready(run(x))
  t = time.perf_counter()
  jax.block_until_ready([run(x) for _ in range(steps)])
  model_img_s = steps * batch / (time.perf_counter() - t)
  fed = [(list(range(batch)), host[i % 2], None) for i in range(steps)]
  inference.predict(fed[:1], lambda _: run)  # warm-up
  preds = inference.predict(fed, lambda _: run)
  fed_img_s = steps * batch / preds.total_seconds
  one = jax.jit(infer).lower(variables, host[0][:per_device]).compile()
  jax.block_until_ready(one(variables, host[0][:per_device]))
  t = time.perf_counter()
  for i in range(steps):
    jax.device_get(one(variables, host[i % 2][:per_device]))  # waited for
  serial_img_s = steps * per_device / (time.perf_counter() - t)
  return {"devices": mesh.size, "per_device_batch": per_device,
          "compile_s": compile_s, "model_img_s": model_img_s,
          "fed_img_s": fed_img_s, "serial_img_s": serial_img_s,
          "fed_vs_model": fed_img_s / model_img_s,
          "fed_vs_serial": fed_img_s / serial_img_s}


JOBS = {"peaks": peaks, "train": train, "deletion": deletion_curves,
        "fewshot": fewshot, "reid": reid, "predict": predict_loop,
        "xai": xai_metrics}
