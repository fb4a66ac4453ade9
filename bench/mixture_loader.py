"""Loader throughput: a mixture of sources (MixedStream) against one source alone (ByteStream).

    python bench/mixture_loader.py DIR_A DIR_B [--seq-len 8192] [--batch 8] [--steps 200] [--repeats 3]

Both deliver the same number of samples of seq_len bytes; the mixture draws half of its
bytes from each directory. Runs alternate, `repeats` times, and the best of each counts;
CPU seconds (all threads) are reported too, steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatrain.data import ByteStream, MixedStream  # noqa: E402
from megatrain.data.mixture import open_sources  # noqa: E402


def measure(make, steps: int) -> dict:
    with make() as stream:
        next(stream)  # the first read (opening files, the first group) is not the rate
        wall, cpu = time.perf_counter(), time.process_time()
        nbytes = 0
        for _ in range(steps):
            nbytes += next(stream).numel()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"bytes_per_s": nbytes / wall, "cpu_s_per_mib": cpu / (nbytes / 2**20)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    common = dict(global_batch_size=args.batch, micro_batch_size=args.batch, seed=0)
    sources = open_sources([("a", args.a, 1.0), ("b", args.b, 1.0)])
    runs = {"single": lambda: ByteStream(args.a, "train", args.seq_len, **common),
            "mixture": lambda: MixedStream(sources, "train", args.seq_len, **common)}
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, make in runs.items():
            result = measure(make, args.steps)
            if name not in best or result["bytes_per_s"] > best[name]["bytes_per_s"]:
                best[name] = result
    best["mixture_over_single"] = best["mixture"]["bytes_per_s"] / best["single"]["bytes_per_s"]
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
