"""The plan of ``benchmarks.gpu_suite``: its jobs in priority order, at GPU and
at smoke sizes, and the rules that choose among them (estimates, options)."""

from __future__ import annotations

# The JAX side's XLA option sets (benchmarks/suite_jax.py); the smoke run
# compares the first two.
OPTION_SETS = ("default", "latency-hiding scheduler", "no command buffers")
KEEP_MARGIN = 1.02  # a non-default option set is kept only when 2% faster

SIZES = {
    "gpu": dict(
        budget_s=450, stage_sizes=None, width=64, iters=10, warmup=2,
        matmul_n=8192, options=OPTION_SETS, est_scale=1.0,
        # (size, resolution, per-device batch): the headline first.
        settings=[(448, "high", 64), (448, "low", 128), (224, "high", 128),
                  (224, "low", 256)],
        remat_batch=128,
        deletion=dict(backbone="resnet50", size=448, images=2, chunk=64,
                      time_steps=0, loop_steps=128, rounds=1),
        fewshot=dict(backbone="resnet12", width=64, size=84, ways=5, shots=5,
                     queries=15, batch=64), fewshot_res=["high", "low"],
        reid=dict(res="reid_high", batch=64, backbone="resnet50", size=(256, 128)),
        xai=dict(images=32, size=224, backbone="resnet18", chunk=128),
        predict=dict(size=224, res="low", batch=128)),
    "smoke": dict(
        budget_s=3600, stage_sizes=(1, 1, 1, 1), width=4, iters=2, warmup=1,
        matmul_n=256, options=OPTION_SETS[:2], est_scale=0.0,
        settings=[(32, "high", 2)],
        remat_batch=4,
        deletion=dict(backbone="resnet50", size=32, images=1, chunk=4,
                      time_steps=0, loop_steps=4, rounds=1),
        fewshot=dict(backbone="resnet12", width=4, size=32, ways=2, shots=1,
                     queries=1, batch=4), fewshot_res=["high"],
        reid=dict(res="reid_high", batch=4, backbone="resnet_tiny", size=(64, 32),
                  width=8),
        xai=dict(images=2, size=32, backbone="resnet_tiny", chunk=64),
        predict=dict(size=32, res="high", batch=2)),
}


def job_id(who: str, kind: str, size=None, res=None, batch=None, dtype=None,
           extra: str = "") -> str:
  parts = [who, kind] + [str(p) for p in (size, res) if p is not None]
  parts += [f"b{batch}"] if batch else []
  parts += [dtype] if dtype else []
  return "/".join(parts) + (f"/{extra}" if extra else "")


def plan(sizes: dict, torch_ok: bool, compile_ok: bool) -> list[dict]:
  """Every job in priority order. ``est_s`` is a GPU estimate (compile +
  timing); ``cap_s`` makes a job run alone, stopped after that long."""
  jobs = []

  def add(side, kind, jid, est_s, cap_s=None, **params):
    jobs.append(dict(id=jid, side=side, kind=kind, est_s=est_s, cap_s=cap_s,
                     **params))

  def train(who, size, res, batch, dtype, est, cap=None, **kw):
    side = "jax" if who == "ours" else "torch"
    extra = kw.get("remat") and f"remat-{kw['remat']}"
    if side == "torch":
      kw["recipe"] = who.split(" ", 1)[1]
    add(side, "train", job_id(who, "train", size, res, batch, dtype, extra or ""),
        est, cap, head="brnpa", size=size, res=res, batch=batch, dtype=dtype, **kw)

  (s0, r0, b0), *others = sizes["settings"]
  bf, f32 = "bfloat16", "float32"
  d, fs, rd = sizes["deletion"], sizes["fewshot"], sizes["reid"]
  # The headline: 448 px high resolution, bfloat16, ours vs every peer.
  add("jax", "peaks", "ours/peaks", 5, n=sizes["matmul_n"])
  train("ours", s0, r0, b0, bf, 60, option_sets=list(sizes["options"]), infer=True)
  train("torch compiled", s0, r0, b0, bf, 120, 240)
  train("torch eager", s0, r0, b0, bf, 10, infer=True)
  train("torch max-autotune", s0, r0, b0, bf, 180, 180)
  # Breadth, cheapest first: ours and eager PyTorch everywhere.
  for s, r, b in others:
    train("ours", s, r, b, bf, 30, infer=True)
  for s, r, b, dtype in ([(*x, bf) for x in others]
                         + [(*x, f32) for x in sizes["settings"]]):
    train("torch eager", s, r, b, dtype, 8, infer=True)
  train("ours", s0, r0, b0, f32, 30, infer=True)
  train("torch compiled", s0, r0, b0, f32, 120, 240)
  add("jax", "deletion", job_id("ours", "deletion", dtype=bf), 60, dtype=bf, opts=d)
  add("torch", "deletion", job_id("torch eager", "deletion", dtype=bf), 15,
      recipe="eager", head="brnpa", size=d["size"], res="high", dtype=bf,
      images=d["images"], chunk=d["chunk"])
  add("jax", "fewshot", job_id("ours", "fewshot", dtype=bf), 40, dtype=bf,
      args=fs, phases=["episodic", "pretrain"], res=sizes["fewshot_res"])
  add("jax", "reid", job_id("ours", "reid", rd["res"], None, rd["batch"], bf), 30,
      dtype=bf, **rd)
  xa = sizes["xai"]
  add("jax", "xai", job_id("ours", "xai", xa["size"], None, xa["images"]), 60, opts=xa)
  pr = sizes["predict"]
  add("jax", "predict", job_id("ours", "predict", pr["size"], pr["res"],
                               pr["batch"], bf), 30, dtype=bf, **pr)
  for s, r, b in dict.fromkeys((sizes["settings"][0], sizes["settings"][-1])):
    add("torch", "infer", job_id("torch compiled", "infer", s, r, b, bf), 60, 150,
        recipe="compiled", head="brnpa", size=s, res=r, batch=b, dtype=bf)
  add("torch", "deletion", job_id("torch compiled", "deletion", dtype=bf), 60, 150,
      recipe="compiled", head="brnpa", size=d["size"], res="high", dtype=bf,
      images=d["images"], chunk=d["chunk"])
  # Rematerialisation where memory binds: a larger batch, with and without.
  for remat in (None, "dots"):
    train("ours", s0, r0, sizes["remat_batch"], bf, 35, remat=remat)
  for s, r, b in others:
    train("torch compiled", s, r, b, bf, 120, 240)
  for s, r, b in others:
    train("ours", s, r, b, f32, 30, infer=True)
  for s, r, b in others:
    train("torch compiled", s, r, b, f32, 120, 240)
  for j in jobs:
    if j["side"] == "torch" and not torch_ok:
      j["skip"] = "torch is not installed here (pip install -r requirements-bench.txt)"
    elif j.get("recipe", "eager") != "eager" and not compile_ok:
      j["skip"] = "torch.compile does not work here (see the preflight)"
  return jobs


def choose_options(by_options: dict) -> str:
  """The option set to keep: the fastest, unless 'default' is within 2%."""
  ok = {k: v["img_s"] for k, v in by_options.items() if "img_s" in v}
  if not ok:
    return "default"
  best = max(ok, key=ok.get)
  if "default" in ok and ok[best] < ok["default"] * KEEP_MARGIN:
    return "default"
  return best


def kind_of(job: dict) -> tuple:
  """Jobs whose times are alike (compilation dominates them)."""
  return (job["side"], job["kind"], job.get("recipe"), bool(job.get("option_sets")),
          job.get("remat"))
