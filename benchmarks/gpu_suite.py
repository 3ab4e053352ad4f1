r"""Every accelerator figure of the benchmarks in one command, within a time budget.

  python -m benchmarks.gpu_suite --out "$OUT"            # on a GPU: at most ~8 minutes
  python -m benchmarks.gpu_suite --out /tmp/suite --smoke  # CPU, tiny sizes, same code paths
  python -m benchmarks.gpu_suite --out "$OUT" --only 'ours/train/*'   # a subset (glob on job ids)

ResNet-50 + BR-NPA (K=3, 200 classes, random data), ours (jitted, state
donated, bfloat16 compute with float32 parameters, the best of several XLA
options) against the same model in PyTorch (``benchmarks/torch_peer.py``:
``torch.compile`` default and ``max-autotune-no-cudagraphs``, bfloat16
autocast, channels-last, fused SGD; and eager): the train step at 448/224 px,
high/low resolution, per-device batches sized for the chip, bfloat16 and
float32; inference; the deletion metric's forwards (batched vs one per step,
bfloat16); the few-shot and re-id train steps; rematerialisation at a larger
batch. FLOPs per step come from the lowered program; MFU is against the
device's published dense peak and a matmul peak measured in the same run.

Needs: Python >= 3.11, jax with its GPU plugin, flax, optax, numpy; for the
PyTorch columns torch, and for ``torch.compile`` on a GPU triton and a C
compiler. Nothing else: the workers block TensorFlow, tensorflow-datasets,
ml_collections, clu and optuna (absent on the GPU machines), so the smoke
test proves the suite runs without them. The first seconds check all of
this and print what is missing.

The jobs run in priority order (``benchmarks/suite_plan.py``; the headline
448 px high-resolution bfloat16 comparison first). This process imports neither jax nor torch: each run of
consecutive jobs of one side goes to a worker subprocess (JAX and PyTorch
never share a process or GPU memory), which appends each job's result to
``results.jsonl`` as soon as it is done and skips a job whose estimated time
no longer fits the budget; long compiles (``torch.compile``) run alone under
a cap. Written to ``--out``: ``suite.md`` (the tables), ``suite.json``
(everything, with the plan and what was skipped and why), ``results.jsonl``
and ``logs/``.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

from benchmarks import suite_report
from benchmarks.suite_plan import SIZES, choose_options, kind_of, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("jax", "flax", "optax", "numpy")
# Absent on the GPU machines; blocked in the workers.
ABSENT_ON_DEVICE = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu",
                    "optuna")
# -- workers ---------------------------------------------------------------------------
def fits(job: dict, now: float, deadline: float, est_scale: float) -> bool:
  """Whether a job's estimated time still fits before the deadline."""
  return now + job["est_s"] * est_scale <= deadline


def _append(path, record):
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def worker(side: str, spec_path: str) -> None:
  """Runs a list of jobs of one side, appending one record per job."""
  for name in ABSENT_ON_DEVICE:  # as on the GPU machines: import fails
    sys.modules.setdefault(name, None)
  with open(spec_path) as f:
    spec = json.load(f)
  # Imported here, after the block above and only in this side's process.
  module = importlib.import_module(f"benchmarks.suite_{side}")
  ctx = spec["ctx"]
  if "probe" in spec:
    print(json.dumps(module.probe(**spec["probe"])))
    return
  for job in spec["jobs"]:
    record = {"id": job["id"]}
    if not fits(job, time.time(), spec["deadline"], ctx["est_scale"]):
      record.update(status="skipped", reason="budget: would not finish in time")
    else:
      t0 = time.time()
      try:
        record.update(status="ok", result=module.JOBS[job["kind"]](job, ctx))
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        lines = str(e).strip().splitlines() or [""]
        record.update(status="error", reason=f"{type(e).__name__}: {lines[0][:300]}")
      record["seconds"] = time.time() - t0
      if record["status"] == "ok" and job.get("option_sets"):
        ctx["options_name"] = choose_options(record["result"]["by_options"])
        record["options_kept"] = ctx["options_name"]
    _append(spec["results"], record)
    print(f"{record['id']}: {record['status']} {record.get('reason', '')}",
          flush=True)


# -- the parent -------------------------------------------------------------------------
class Suite:
  """Preflight, then the plan's jobs in worker processes, then the report."""

  def __init__(self, args):
    self.args = args
    self.sizes = dict(SIZES["smoke" if args.smoke else "gpu"])
    if args.budget_s:
      self.sizes["budget_s"] = args.budget_s
    self.out = os.path.abspath(args.out)
    os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
    self.results = os.path.join(self.out, "results.jsonl")
    open(self.results, "w").close()
    self.t0 = time.time()
    self.deadline = self.t0 + self.sizes["budget_s"]
    self.ctx = dict(stage_sizes=self.sizes["stage_sizes"], width=self.sizes["width"],
                    iters=self.sizes["iters"], warmup=self.sizes["warmup"],
                    est_scale=self.sizes["est_scale"], options_name="default")
    self.records: dict[str, dict] = {}
    self.calls = 0

  def log(self, msg):
    print(f"[{time.time() - self.t0:6.1f} s] {msg}", flush=True)

  def _spawn(self, side, spec, timeout):
    """Runs a worker; returns its exit code, or None when it was stopped."""
    self.calls += 1
    path = os.path.join(self.out, "logs", f"{self.calls:02d}-{side}")
    with open(path + ".json", "w") as f:
      json.dump(spec, f)
    env = dict(os.environ)
    if side == "jax":
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
      if self.args.smoke:  # code paths, not speed: XLA's cheapest compilation
        env["XLA_FLAGS"] = " ".join(
            [env.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
             "--xla_llvm_disable_expensive_passes=true"]).strip()
    with open(path + ".log", "w") as log:
      proc = subprocess.Popen(
          [sys.executable, "-m", "benchmarks.gpu_suite", "--worker", side,
           "--spec", path + ".json"], stdout=log, stderr=subprocess.STDOUT,
          env=env, cwd=REPO)
      try:
        return proc.wait(timeout=max(timeout, 1))
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None

  def preflight(self) -> dict:
    """Module checks (instant), then both sides' probes in parallel."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
      raise SystemExit(f"missing: {', '.join(missing)}. The suite needs jax (with "
                       "its GPU plugin), flax, optax and numpy.")
    have_torch = importlib.util.find_spec("torch") is not None
    specs = {"jax": {"ctx": self.ctx, "probe": {}}}
    if have_torch:
      specs["torch"] = {"ctx": self.ctx, "probe": {"compile_check": True}}
    procs = {}
    for side, spec in specs.items():
      path = os.path.join(self.out, "logs", f"probe-{side}")
      with open(path + ".json", "w") as f:
        json.dump(spec, f)
      procs[side] = subprocess.Popen(
          [sys.executable, "-m", "benchmarks.gpu_suite", "--worker", side,
           "--spec", path + ".json"], stdout=subprocess.PIPE,
          stderr=open(path + ".log", "w"), text=True, cwd=REPO,
          env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
    info = {"python": sys.version.split()[0]}
    for side, proc in procs.items():
      try:
        stdout, _ = proc.communicate(timeout=180)
        info[side] = json.loads(stdout.strip().splitlines()[-1])
      except (subprocess.TimeoutExpired, ValueError, IndexError):
        proc.kill()
        info[side] = {"error": f"the {side} probe failed; see logs/probe-{side}.log"}
    if "error" in info["jax"]:
      raise SystemExit(info["jax"]["error"] + " (jax must import with flax, optax "
                       "and this repository, without TensorFlow or ml_collections).")
    if not self.args.smoke and info["jax"]["platform"] == "cpu":
      raise SystemExit("jax sees no accelerator (platform cpu). On a GPU machine "
                       "install the jax CUDA plugin; --smoke runs the suite on a CPU.")
    torch_info = info.get("torch", {"error": "torch is not installed"})
    info["torch_ok"] = "error" not in torch_info
    info["compile_ok"] = bool(torch_info.get("compile_ok"))
    self.log(f"jax {info['jax']['jax']} on {info['jax']['device_kind']}; " + (
        f"torch {torch_info['torch']} on {torch_info['device_name']}, "
        f"torch.compile {'works' if info['compile_ok'] else 'FAILS: ' + str(torch_info.get('compile_error'))}"
        if info["torch_ok"] else f"PyTorch columns skipped: {torch_info['error']}"))
    return info

  def resume(self, path: str, jobs: list[dict]) -> None:
    """Keeps the finished jobs of an earlier run's results.jsonl."""
    wanted = {j["id"] for j in jobs if j["kind"] != "peaks"}
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if r["id"] in wanted and r.get("status") == "ok":
          r["resumed_from"] = path
          self.records[r["id"]] = r
          _append(self.results, r)
          if r.get("options_kept"):
            self.ctx["options_name"] = r["options_kept"]
    self.log(f"kept {len(self.records)} finished jobs of {path}")

  def run(self, jobs: list[dict]) -> None:
    """Runs the jobs, a worker per run of one side (capped jobs alone).

    A job's time estimate is replaced by the time the last job of its kind
    took, so the budget is planned with this machine's figures."""
    pending = [j for j in jobs if not j.get("skip") and j["id"] not in self.records]
    for j in jobs:
      if j.get("skip"):
        self.records[j["id"]] = {"id": j["id"], "status": "skipped", "reason": j["skip"]}
    took = {}
    while pending:
      for j in self.records.values():
        job = next((x for x in jobs if x["id"] == j["id"]), None)
        if job and j.get("status") == "ok" and "seconds" in j:
          took[kind_of(job)] = j["seconds"]
      for j in pending:
        j["est_s"] = took.get(kind_of(j), j["est_s"])
      side, cap = pending[0]["side"], pending[0]["cap_s"]
      group = [pending.pop(0)]
      while not cap and pending and pending[0]["side"] == side and not pending[0]["cap_s"]:
        group.append(pending.pop(0))
      left = self.deadline - time.time()
      if left <= 0:
        for j in group:
          self.records[j["id"]] = {"id": j["id"], "status": "skipped",
                                   "reason": "budget: the time was spent"}
        continue
      timeout = min(cap, left) if cap else left + 15
      spec = {"ctx": self.ctx, "jobs": group, "deadline": self.deadline,
              "results": self.results}
      rc = self._spawn(side, spec, timeout)
      done = self._read()
      missing = [j for j in group if j["id"] not in done]
      if missing:
        first = missing.pop(0)
        why = (f"stopped after {timeout:.0f} s "
               f"({'its cap' if cap and cap <= left else 'the budget'})"
               if rc is None else f"worker exited with code {rc}; see logs/")
        self.records[first["id"]] = {"id": first["id"], "status": "error",
                                     "reason": why}
        pending = missing + pending  # the rest of the group, in a new worker
      for jid in [j["id"] for j in group]:
        r = self.records.get(jid, {})
        self.log(f"{jid}: {suite_report.summary(r)}")

  def _read(self) -> set:
    with open(self.results) as f:
      for line in f:
        r = json.loads(line)
        self.records[r["id"]] = r
        if r.get("options_kept"):
          self.ctx["options_name"] = r["options_kept"]
    return set(self.records)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--out", help="folder for suite.md, suite.json, logs/")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes on any device (the CI test)")
  p.add_argument("--budget_s", type=float,
                 help=f"seconds for everything (default {SIZES['gpu']['budget_s']})")
  p.add_argument("--only", help="comma-separated globs on job ids, e.g. "
                 "'ours/train/*,torch compiled/train/448/*'")
  p.add_argument("--list", action="store_true", help="print the plan and exit")
  p.add_argument("--resume", help="an earlier run's results.jsonl: its finished "
                 "jobs are kept, not run again")
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    return worker(args.worker, args.spec)
  sizes = SIZES["smoke" if args.smoke else "gpu"]
  if args.list:
    for j in plan(sizes, True, True):
      print(f"{j['est_s']:>5.0f} s{' cap ' + str(j['cap_s']) if j['cap_s'] else ''}"
            f"\t{j['id']}")
    return None
  if not args.out:
    p.error("--out is required")
  suite = Suite(args)
  info = suite.preflight()
  jobs = plan(suite.sizes, info["torch_ok"], info["compile_ok"])
  if args.only:
    globs = [g.strip() for g in args.only.split(",") if g.strip()]
    jobs = [j for j in jobs if j["kind"] == "peaks"
            or any(fnmatch.fnmatch(j["id"], g) for g in globs)]
  if args.resume:
    suite.resume(args.resume, jobs)
  suite.run(jobs)
  report = suite_report.write(suite.out, info, jobs, suite.records, suite.ctx,
                              suite.sizes, time.time() - suite.t0, args)
  with open(report) as f:
    print("\n" + f.read(), flush=True)
  suite.log(f"wrote {report} and suite.json")
  return report


if __name__ == "__main__":
  main()
