"""What bench/gpu_check.sh measured, against issue 12's goals on an H200: one line per part.

    python bench/gpu_summary.py OUT_DIR

Reads the bench parts' JSON lines (PART.out, the plans' plan-*.out) and the pretrain parts'
metrics (PART.jsonl).
"""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def lines(name):  # a bench part's NAME.out, or a pretrain part's metrics NAME.jsonl
    path = out / name
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")] if path.exists() else []


def figure(part, name):
    return next((l for l in reversed(lines(f"{part}.out")) if l.get("figure") == name), None)


def pct(x):
    return "-" if x is None else f"{x:.1%}"


def row(name, bytes_per_s, step_s, mfu, mfu_datasheet, memory, note=""):
    print(f"  {name:18} {bytes_per_s:12,.0f} B/s  step {step_s:6.2f} s  mfu {pct(mfu)} "
          f"(datasheet {pct(mfu_datasheet)})  mem {memory:6.1f} GiB{note}")


def goal(text, met):
    print(f"  goal {text}: {'met' if met else 'NOT met'}")


device = next((l["device"] for p in sorted(out.glob("*.out")) for l in lines(p.name) if "device" in l), "?")
print(f"figures on {device}:")
trained = {}
for part in ("bench-text", "bench-text-mb12", "bench-text-nodrop", "bench-long", "bench-long-half", "bench-long-nockpt"):
    t = figure(part, "train")
    if t and "error" not in t:
        trained[part] = t
        row(part, t["train_bytes_per_s"], t["step_s"], t["mfu"], t.get("mfu_datasheet"), t["peak_memory_gib"])
    elif t:
        print(f"  {part:18} {t['error']} (peak {t['peak_memory_gib']:.1f} GiB)")
for part in ("pretrain-text", "pretrain-long", "pretrain-long-fit"):
    steps = lines(f"{part}.jsonl")[1:]  # the first step also sets up every kernel
    if steps:
        s = trained[part] = max(steps, key=lambda s: s["bytes_per_s"])
        row(part, s["bytes_per_s"], s["step_s"], s["mfu"], s.get("mfu_datasheet"), s["peak_memory_gib"],
            f"  (best of steps 2-{len(steps) + 1})")
g = figure("generation", "generation")
if g:
    print(f"  generation         {g['gen_cached_bytes_per_s']:,.0f} B/s cached, {g['plain_transformer_bytes_per_s']:,.0f} "
          f"B/s plain ({g['plain_transformer_layers']} x {g['plain_transformer_dim']}): {g['gen_vs_plain_transformer']:.2f}x")
for part in ("bench-text", "pretrain-text"):
    if part in trained:
        goal(f"text-1b MFU >= 50% of the measured matmul peak ({part})", trained[part]["mfu"] >= 0.5)
        if trained[part].get("mfu_datasheet") is not None:
            goal(f"text-1b MFU >= 40% of the datasheet peak ({part})", trained[part]["mfu_datasheet"] >= 0.4)
for part in ("bench-long", "pretrain-long"):
    if figure(part, "train") or lines(f"{part}.jsonl"):
        goal(f"megabyte-1m trains with activation checkpointing ({part})", part in trained)
if "bench-long" in trained and "bench-long-half" in trained:
    half, every = trained["bench-long-half"], trained["bench-long"]
    print(f"  megabyte-1m recomputing {half['recomputed_blocks']} of its blocks against all "
          f"{every['recomputed_blocks']}: {half['train_bytes_per_s'] / every['train_bytes_per_s']:.2f}x the bytes/s, "
          f"{half['peak_memory_gib']:.1f} against {every['peak_memory_gib']:.1f} GiB")
# the stages estimate of each pretrain-long run's memory (bench --figures stages) against its peak
for part, plan in (("pretrain-long", "plan-long"), ("pretrain-long-fit", "plan-long-fit")):
    estimate = figure(plan, "stages")
    if part in trained and estimate:
        print(f"  {part}: peak {trained[part]['peak_memory_gib']:.1f} GiB, estimated "
              f"{estimate['max_memory_mib'] / 1024:.1f} GiB")
fit_plan = figure("plan-long-fit", "stage")
if "pretrain-long" in trained and "pretrain-long-fit" in trained and fit_plan:
    fit, every = trained["pretrain-long-fit"], trained["pretrain-long"]
    print(f"  megabyte-1m through the trainer recomputing {fit_plan['recomputed_blocks']} blocks (checkpoint_blocks "
          f"auto) against all: {fit['bytes_per_s'] / every['bytes_per_s']:.2f}x the bytes/s")
if g:
    goal("generating 8,192 bytes >= 1.4x a same-size plain transformer", g["gen_vs_plain_transformer"] >= 1.4)
