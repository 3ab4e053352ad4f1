"""The tables of ``benchmarks.gpu_suite``: suite.md and suite.json from its records."""

from __future__ import annotations

import json
import math
import os

PEERS = ("torch compiled", "torch max-autotune", "torch eager")


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def f(x, spec: str = ".1f", suffix: str = "") -> str:
  return f"{x:{spec}}{suffix}" if _num(x) else "-"


def _tera(x):
  return x / 1e12 if _num(x) else None


def ratio(a, b) -> str:
  return f"{a / b:.2f}x" if _num(a) and _num(b) and b else "-"


def pct(flops_per_s, peak) -> str:
  return f"{flops_per_s / peak:.1%}" if _num(flops_per_s) and _num(peak) and peak else "-"


def summary(record: dict) -> str:
  """One line for the progress log."""
  if record.get("status") != "ok":
    return f"{record.get('status', 'not run')}: {record.get('reason', '')}"
  r = record["result"]
  if "by_options" in r:
    best = record.get("options_kept") or next(iter(r["by_options"]))
    r = r["by_options"].get(best, {})
  if "img_s" in r:
    return f"{r['img_s']:.1f} img/s" + (
        f", compile {r['compile_s']:.1f} s" if _num(r.get("compile_s")) else "")
  if "s_per_image" in r:
    return f"{r['s_per_image']:.3f} s/image"
  if "matmul_bfloat16" in r:
    return (f"matmul bfloat16 {r['matmul_bfloat16'] / 1e12:.1f} TFLOP/s, "
            f"float32 {r['matmul_float32'] / 1e12:.1f} TFLOP/s")
  return f"done in {record.get('seconds', 0):.0f} s"


class _Figures:
  """Looks up results by job id."""

  def __init__(self, jobs, records, ctx):
    self.jobs = {j["id"]: j for j in jobs}
    self.records = records
    self.ctx = ctx

  def result(self, jid):
    r = self.records.get(jid, {})
    return r.get("result") if r.get("status") == "ok" else None

  def train(self, jid):
    """A train job's figures (ours: under the options kept)."""
    r = self.result(jid)
    if not r or "by_options" not in r:
      return r
    rec = self.records[jid]
    name = rec.get("options_kept") or self.ctx.get("options_name", "default")
    figures = r["by_options"].get(name) or next(iter(r["by_options"].values()))
    return dict(figures, infer=r.get("infer"), flops=r["flops"])


def _train_tables(fig, settings, peaks):
  head = ("| size | res | batch | dtype | ours img/s | torch compiled | torch "
          "max-autotune | torch eager | ours / best compiled | ours / eager | "
          "MFU ours | of measured matmul | MFU best torch |\n" + "|---" * 13 + "|")
  cost = ("| size | res | batch | dtype | GFLOP/step | compile s: ours / compiled / "
          "max-autotune | MiB: ours / compiled / eager |\n" + "|---" * 7 + "|")
  rows, cost_rows = [head], [cost]
  for dtype in ("bfloat16", "float32"):
    for size, res, batch in settings:
      key = f"{size}/{res}/b{batch}/{dtype}"
      ours = fig.train(f"ours/train/{key}")
      peers = {p: fig.train(f"{p}/train/{key}") for p in PEERS}
      if not ours and not any(peers.values()):
        continue
      ips = lambda r: r.get("img_s") if r else None
      compiled = [ips(peers[p]) for p in PEERS[:2] if _num(ips(peers[p]))]
      best_compiled = max(compiled) if compiled else None
      best_torch = max([x for x in map(ips, peers.values()) if _num(x)], default=None)
      flops = ours.get("flops") if ours else None
      published = peaks.get(f"published_{dtype}")
      rows.append(
          f"| {size} | {res} | {batch} | {dtype} | **{f(ips(ours))}** | "
          + " | ".join(f(ips(peers[p])) for p in PEERS)
          + f" | **{ratio(ips(ours), best_compiled)}** | {ratio(ips(ours), ips(peers['torch eager']))}"
          f" | {pct(ours and ours.get('flops_per_s'), published)}"
          f" | {pct(ours and ours.get('flops_per_s'), peaks.get(f'matmul_{dtype}'))}"
          f" | {pct(flops * best_torch / batch if _num(flops) and _num(best_torch) else None, published)} |")
      mib = lambda r: f(r.get("mib"), ".0f") if r else "-"
      comp = lambda r: f(r.get("compile_s"), ".0f") if r else "-"
      cost_rows.append(
          f"| {size} | {res} | {batch} | {dtype} | {f(flops and flops / 1e9, '.4g')} | "
          f"{comp(ours)} / {comp(peers['torch compiled'])} / "
          f"{comp(peers['torch max-autotune'])} | {mib(ours)} / "
          f"{mib(peers['torch compiled'])} / {mib(peers['torch eager'])} |")
  return rows, cost_rows


def _infer_table(fig, settings):
  rows = ["| size | res | batch | dtype | ours img/s | torch compiled | torch eager | "
          "ours / compiled | ours / eager |\n" + "|---" * 9 + "|"]
  for dtype in ("bfloat16", "float32"):
    for size, res, batch in settings:
      key = f"{size}/{res}/b{batch}/{dtype}"
      ours = (fig.train(f"ours/train/{key}") or {}).get("infer")
      eager = (fig.train(f"torch eager/train/{key}") or {}).get("infer")
      compiled = fig.result(f"torch compiled/infer/{key}")
      if not (ours or eager or compiled):
        continue
      g = lambda r: r.get("img_s") if r else None
      rows.append(f"| {size} | {res} | {batch} | {dtype} | **{f(g(ours))}** | "
                  f"{f(g(compiled))} | {f(g(eager))} | **{ratio(g(ours), g(compiled))}** | "
                  f"{ratio(g(ours), g(eager))} |")
  return rows if len(rows) > 1 else []


def _options_table(fig, jobs):
  sweep = next((j for j in jobs if j.get("option_sets")), None)
  r = fig.result(sweep["id"]) if sweep else None
  if not r:
    return []
  kept = fig.records[sweep["id"]].get("options_kept")
  base = r["by_options"].get("default", {}).get("img_s")
  rows = [f"XLA options on `{sweep['id']}` (each a compilation of the same "
          "program; the kept one is used for every later JAX row):\n",
          "| options | img/s | vs default | compile s | kept |\n|---|---|---|---|---|"]
  for name, v in r["by_options"].items():
    rows.append(f"| {name} | {f(v.get('img_s'))} | {ratio(v.get('img_s'), base)} | "
                f"{f(v.get('compile_s'))} | {'yes' if name == kept else v.get('error', '')} |")
  return rows


def _deletion_table(fig):
  ours = fig.result("ours/deletion/bfloat16")
  peers = {p: fig.result(f"{p}/deletion/bfloat16") for p in ("torch compiled", "torch eager")}
  if not ours and not any(peers.values()):
    return []
  rows = ["| protocol | forwards/image | ours batched s/image | ours one forward per step "
          "| one per step / batched | torch compiled batched | torch eager batched |"
          "\n" + "|---" * 7 + "|"]
  for r in (ours or {}).get("rows", [{"protocol": "release"}]):
    torch_cols = (" | ".join(f((peers[p] or {}).get("s_per_image"), ".3f")
                             for p in peers) if r["protocol"] == "release" else "- | -")
    rows.append(f"| {r['protocol']} | {r.get('forwards', '-')} | {f(r.get('batched_s'), '.3f')} | "
                f"{f(r.get('loop_s'), '.3f')} | {f(r.get('ratio'), '.1f', 'x')} | {torch_cols} |")
  return rows


def _small_tables(fig, jobs):
  out = []
  fs = next((j for j in jobs if j["kind"] == "fewshot"), None)
  r = fig.result(fs["id"]) if fs else None
  if r:
    out += ["", f"Few-shot (`{fs['id']}`, {fs['args']}):", "",
            "| phase | res | images/step | s/step | img/s | first call s |",
            "|---|---|---|---|---|---|"]
    out += [f"| {x['phase']} | {x['res']} | {x['images']} | {x['step_s']:.4f} | "
            f"{x['img_s']:.0f} | {x['first_s']:.1f} |" for x in r["rows"]]
  rd = next((j for j in jobs if j["kind"] == "reid"), None)
  r = fig.result(rd["id"]) if rd else None
  if r:
    out += ["", f"Re-id train step (`{rd['id']}`, {rd['backbone']}, {tuple(rd['size'])} px):", "",
            "| res | batch | s/step | img/s | GFLOP/step | GiB | compile s |",
            "|---|---|---|---|---|---|---|",
            f"| {r['res']} | {r['batch']} | {r['step_s']:.4f} | {r['img_per_s']:.0f} | "
            f"{r['gflop']:.0f} | {r['gib']:.2f} | {r['compile_s']:.1f} |"]
  xj = next((j for j in jobs if j["kind"] == "xai"), None)
  r = fig.result(xj["id"]) if xj else None
  if r:
    o = xj["opts"]
    out += ["", f"Quantus-family metrics, ours (`{xj['id']}`, {o['backbone']}, "
            f"{o['images']} images of {o['size']} px; benchmarks/xai.py):", "",
            "| metric | s (first call) | s (compiled) | s/image |", "|---|---|---|---|"]
    out += [f"| {x['metric']} | {x['ours_first_s']:.2f} | {x['ours_s']:.3f} | "
            f"{x['ours_s'] / x['images']:.4f} |" for x in r["rows"]]
  pj = next((j for j in jobs if j["kind"] == "predict"), None)
  r = fig.result(pj["id"]) if pj else None
  if r:
    out += ["", f"Batch inference, `predict`'s loop (`{pj['id']}`, batch per device; "
            "fed: from host memory, overlapped; serial: one device, each batch "
            "waited for):", "",
            "| devices | model img/s | fed img/s | serial img/s | fed / model | fed / serial |",
            "|---|---|---|---|---|---|",
            f"| {r['devices']} | {r['model_img_s']:.0f} | {r['fed_img_s']:.0f} | "
            f"{r['serial_img_s']:.0f} | {r['fed_vs_model']:.2f} | {r['fed_vs_serial']:.2f}x |"]
  remat = [j for j in jobs if j["kind"] == "train" and "remat" in j]
  figs = [(j, fig.train(j["id"])) for j in remat]
  if any(r for _, r in figs):
    base = figs[0][1]
    out += ["", "Rematerialisation (`jax.checkpoint` on the backbone; `dots`: "
            "convolution outputs saved, BatchNorm and ReLU recomputed):", "",
            "| job | img/s | vs none | MiB | vs none |", "|---|---|---|---|---|"]
    for j, r in figs:
      r = r or {}
      out.append(f"| {j['id']} | {f(r.get('img_s'))} | {ratio(r.get('img_s'), base and base.get('img_s'))} | "
                 f"{f(r.get('mib'), '.0f')} | {ratio(r.get('mib'), base and base.get('mib'))} |")
  return out


def j_skip(jobs, jid) -> bool:
  """Whether the plan skipped the job for a reason a rerun does not change."""
  return any(j["id"] == jid and j.get("skip") for j in jobs)


def write(out_dir, info, jobs, records, ctx, sizes, elapsed, args) -> str:
  """Writes suite.md and suite.json; returns the Markdown path."""
  fig = _Figures(jobs, records, ctx)
  peaks = fig.result("ours/peaks") or {}
  settings = [tuple(s) for s in sizes["settings"]]
  remat_b = sizes["remat_batch"]
  settings += [(settings[0][0], settings[0][1], remat_b)] if remat_b != settings[0][2] else []
  jx, tp = info.get("jax", {}), info.get("torch", {})
  lines = [
      f"# Benchmark suite{' (smoke: tiny sizes)' if args.smoke else ''}", "",
      f"`python -m benchmarks.gpu_suite{' --smoke' if args.smoke else ''} --out ...`: "
      f"{jx.get('device_kind')} ({jx.get('platform')}), Python {jx.get('python')}, "
      f"jax {jx.get('jax')}, flax {jx.get('flax')}"
      + (f", torch {tp['torch']} ({tp.get('device_name')})" if "torch" in tp else
         ", no PyTorch") + f"; {elapsed:.0f} s of a {sizes['budget_s']:.0f} s budget.",
      "",
      f"Matmul peak measured in this run: bfloat16 {f(_tera(peaks.get('matmul_bfloat16')), '.1f')} "
      f"TFLOP/s, float32 (default precision) {f(_tera(peaks.get('matmul_float32')), '.1f')} "
      f"TFLOP/s; published dense peak: "
      + (f"{peaks['published_bfloat16'] / 1e12:.1f} / {peaks['published_float32'] / 1e12:.1f} TFLOP/s"
         if _num(peaks.get("published_bfloat16")) else "none for this device")
      + f". Model: ResNet-50 + BR-NPA (K=3){'' if not sizes['stage_sizes'] else ' with stages ' + str(sizes['stage_sizes']) + ', width ' + str(sizes['width'])}, "
      f"200 classes, random data; medians of {sizes['iters']} steps after {sizes['warmup']} warm-up.",
      "", "## Train step (images/s)", ""]
  rows, cost_rows = _train_tables(fig, settings, peaks)
  lines += rows + ["", "MFU: the step's FLOPs (lowered program) over its time, against the "
                   "published dense peak of the dtype (float32: TF32); *of measured matmul*: "
                   "against this run's matmul rate. Compile s, memory (ours: XLA's arguments "
                   "+ temporaries; PyTorch: peak allocated):", ""] + cost_rows
  opts = _options_table(fig, jobs)
  if opts:
    lines += ["", *opts]
  infer = _infer_table(fig, settings)
  if infer:
    lines += ["", "## Inference (images/s)", "", *infer]
  dele = _deletion_table(fig)
  if dele:
    lines += ["", "## Deletion metric, bfloat16 forwards (seconds per image)", "", *dele]
  small = _small_tables(fig, jobs)
  if small:
    lines += ["", "## Other steps", *small]
  not_run = [(j["id"], records.get(j["id"], {})) for j in jobs
             if records.get(j["id"], {}).get("status") != "ok"]
  if not_run:
    lines += ["", "## Not measured", ""]
    lines += [f"- `{jid}`: {r.get('status', 'not run')}, {r.get('reason', '')}"
              for jid, r in not_run]
    again = [jid for jid, r in not_run if not j_skip(jobs, jid)]
    if again:
      lines += ["", "To run them: `python -m benchmarks.gpu_suite --out DIR --only '"
                + ",".join(again) + "'`"]
  md = os.path.join(out_dir, "suite.md")
  with open(md, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "suite.json"), "w") as fh:
    json.dump({"preflight": info, "sizes": sizes, "elapsed_s": elapsed,
               "options_kept": ctx.get("options_name"),
               "jobs": [dict(j, **{k: v for k, v in records.get(j["id"], {}).items()
                                   if k != "id"}) for j in jobs]},
              fh, indent=1, default=str)
  return md
