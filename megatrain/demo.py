"""`make demo`: shard a corpus, pretrain with DeepSpeed on 2 ranks, evaluate, generate.

    python -m megatrain.demo [--run-dir runs/demo] [--config configs/demo.yaml] [--steps N]

The corpus is the running Python's standard library sources, real bytes that every
machine has, as a mixture of two sources: its top-level modules and some of its
packages, a quarter of the training bytes (`SOURCES`). Each step runs the same
command a user would, and its output goes to a log file in the run folder; the
summary (validation per source and their byte-weighted mean) and the loss curve
(one validation line per source) come last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


PACKAGES = ("email", "json", "http", "logging", "urllib")
# name: share of the training bytes
SOURCES = {"modules": 0.75, "packages": 0.25}


def corpus_files() -> dict[str, list[Path]]:
    """Each source's files: the standard library's top-level modules (about 4.7 MB of Python
    source) and the modules of a few of its packages (about 1 MB)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {"modules": sorted(stdlib.glob("*.py")),
            "packages": sorted(p for package in PACKAGES for p in (stdlib / package).rglob("*.py"))}


def run_step(name: str, cmd: list[str], run_dir: Path, env: dict[str, str] | None = None) -> str:
    """Run one stage of the demo, logging to run_dir/NAME.log; fail loudly with its tail."""
    log = run_dir / f"{name}.log"
    print(f"[demo] {name}: {' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}", flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True)
    log.write_bytes(result.stdout + result.stderr)
    if result.returncode:
        tail = (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        raise SystemExit(f"[demo] {name} failed (exit {result.returncode}); see {log}\n{tail}")
    print(f"[demo] {name}: done in {time.time() - start:.0f}s", flush=True)
    return result.stdout.decode(errors="replace")


def launcher(ranks: int) -> tuple[list[str], dict[str, str]]:
    """The deepspeed command and environment: all GPUs when there are some, else `ranks`
    CPU processes (gloo), on a free rendezvous port."""
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", port]
    if torch.cuda.is_available():
        return command, {}
    return [*command, "--num_gpus", str(ranks)], {"DS_ACCELERATOR": "cpu"}


def plot_loss(metrics: Path, out: Path) -> bool:
    """The training loss curve as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["bpb"] for r in rows], label="train (mixture)")
    for name in SOURCES:
        val = [r for r in rows if f"val_bpb/{name}" in r]
        if val:
            ax.plot([r["step"] for r in val], [r[f"val_bpb/{name}"] for r in val], "o-", label=f"validation: {name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per byte")
    ax.set_title("MEGABYTE demo: Python standard library")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatrain.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--ranks", type=int, default=2, help="CPU processes when there is no GPU")
    parser.add_argument("--eval-bytes", type=int, default=None, help="score only this many validation bytes")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data, ckpt, model = run_dir / "data", run_dir / "checkpoints", run_dir / "model.pt"
    metrics = run_dir / "metrics.jsonl"
    py = sys.executable
    started = time.time()

    for name, files in corpus_files().items():
        run_step(f"shards-{name}", [py, "-m", "data_prep.build_shards", *map(str, files), "--output",
                                    str(data / name), "--val-fraction", "0.05", "--seed", "0"], run_dir)
    mixture = [a for name, weight in SOURCES.items() for a in ("--data", f"{name}={data / name}:{weight}")]
    steps = ["--train-steps", str(args.steps)] if args.steps else []
    command, env = launcher(args.ranks)
    run_step("pretrain", [*command, "launch/pretrain.py", "--config", args.config, *mixture, "--pp", "2",
                          "--save", str(ckpt), "--metrics", str(metrics), *steps], run_dir, env)
    run_step("export", [py, "-m", "megatrain.checkpoint", "export", str(ckpt), str(model)], run_dir)
    limit = ["--max-bytes", str(args.eval_bytes)] if args.eval_bytes else []
    sources = [a for name in SOURCES for a in ("--data", f"{name}={data / name}")]
    *per_source, evaluation = map(json.loads, run_step("evaluate", [py, "-m", "megatrain.evaluate", "--load",
                                                                    str(model), *sources, "--split", "val", *limit],
                                                       run_dir).splitlines()[-len(SOURCES) - 1:])
    prompt = "def "
    sample = run_step("generate", [py, "-m", "megatrain.generate", "--load", str(model), "--prompt", prompt,
                                   "--max-bytes", "300", "--temperature", "0.8", "--seed", "0"], run_dir)
    (run_dir / "sample.txt").write_text(prompt + sample)
    curve = run_dir / "loss.png"
    has_curve = plot_loss(metrics, curve)

    last = json.loads(metrics.read_text().splitlines()[-1])
    rows = [("steps", last["step"]), ("final train bits/byte", f"{last['bpb']:.3f}"),
            *((f"validation bits/byte: {r['source']}", f"{r['bpb']:.3f} over {r['bytes']:,} bytes")
              for r in per_source),
            ("validation bits/byte", f"{evaluation['bpb']:.3f} over {evaluation['bytes']:,} bytes (byte-weighted)"),
            ("training bytes/s", f"{last['bytes_per_s']:,.0f}"),
            ("wall time", f"{time.time() - started:.0f}s"),
            ("loss curve", str(curve) if has_curve else "(pip install matplotlib for the PNG)"),
            ("run folder", str(run_dir))]
    print(f"\n--- sample (prompt {prompt!r}) ---\n{prompt}{sample}\n---")
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
