"""Loader throughput against `zstd -d` of the same bytes, on the same machine, in one run.

    python -m megatrain.data.bench DIR [--seq-len N ...] [--split train] [--max-bytes N] [--json]

The baseline is the split's stream (the exact bytes the loader delivers, in stream
order) compressed as one .zst file at the shards' zstd level and decompressed by
`zstd -d` to /dev/null; where the zstd command is missing, by the `zstandard` module
(the result says which). Loader and baseline runs alternate, `repeats` times, and the
best of each counts. CPU seconds are reported too (all loader threads; the zstd
process): on a shared machine they are steadier than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zstandard

from megatrain.data.loader import ByteStream
from megatrain.data.stream import SplitStream


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _write_baseline(stream: SplitStream, nbytes: int, level: int, path: Path) -> None:
    compressor = zstandard.ZstdCompressor(level=level)
    chunk = np.empty(16 << 20, np.uint8)
    with open(path, "wb") as f, compressor.stream_writer(f, size=nbytes) as writer:
        for start in range(0, nbytes, len(chunk)):
            piece = chunk[: min(len(chunk), nbytes - start)]
            stream.read_into(start, piece)
            writer.write(piece.data)


def _decompress(path: Path) -> tuple[Callable[[], None], str]:
    """A function that decompresses `path` to nothing, and what it uses."""
    cli = shutil.which("zstd")
    if cli:
        banner = subprocess.run([cli, "--version"], capture_output=True, text=True).stdout
        version = re.search(r"v\d[\w.]*", banner)

        def run_cli() -> None:
            subprocess.run([cli, "-d", "-q", "-c", str(path)], stdout=subprocess.DEVNULL, check=True)

        return run_cli, f"zstd -d ({version.group(0) if version else 'unknown version'})"

    def run_module() -> None:
        with open(path, "rb") as f, open(os.devnull, "wb") as sink:
            zstandard.ZstdDecompressor().copy_stream(f, sink)

    return run_module, f"zstandard {zstandard.__version__} module (no zstd command found)"


def loader_benchmark(
    data_dir: Path | str,
    seq_len: int,
    split: str = "train",
    max_bytes: int | None = None,
    micro_batch_size: int | None = None,
    repeats: int = 3,
    **loader_options: Any,
) -> dict[str, Any]:
    """Bytes/s of ByteStream (one rank) over up to `max_bytes` of the split against the baseline.

    The micro-batch defaults to about 1 MiB (at least one window); one step is one
    micro-batch. Extra keyword arguments go to ByteStream.
    """
    stream = SplitStream(data_dir, split)
    micro = micro_batch_size or max(1, (1 << 20) // seq_len)
    limit = stream.length if max_bytes is None else min(max_bytes, stream.length)
    steps = limit // (seq_len * micro)
    if steps < 1:
        raise ValueError(f"{limit} bytes of {split!r} are less than one micro-batch of {micro} x {seq_len}")
    nbytes = steps * micro * seq_len

    def run_loader() -> tuple[float, float]:
        """(wall, CPU) seconds from the first request to the last batch (start-up and shutdown excluded)."""
        with ByteStream(data_dir, split, seq_len, micro, micro, **loader_options) as loader:
            wall, cpu = time.perf_counter(), _cpu_seconds()
            for _, batch in zip(range(steps), loader):
                assert batch.shape == (micro, seq_len)
            return time.perf_counter() - wall, _cpu_seconds() - cpu

    def run_baseline() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        decompress()
        return time.perf_counter() - wall, _cpu_seconds() - cpu

    level = int(stream.manifest.build.get("zstd_level", 3))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "baseline.zst"
        _write_baseline(stream, nbytes, level, path)
        decompress, baseline = _decompress(path)
        runs = [(run_loader(), run_baseline()) for _ in range(repeats)]
    loader_seconds, loader_cpu = (min(times) for times in zip(*(loader for loader, _ in runs)))
    baseline_seconds, baseline_cpu = (min(times) for times in zip(*(base for _, base in runs)))
    return {
        "split": split,
        "seq_len": seq_len,
        "micro_batch_size": micro,
        "bytes": nbytes,
        "loader_bytes_per_s": nbytes / loader_seconds,
        "baseline_bytes_per_s": nbytes / baseline_seconds,
        "ratio": baseline_seconds / loader_seconds,
        "loader_cpu_bytes_per_s": nbytes / loader_cpu,
        "baseline_cpu_bytes_per_s": nbytes / baseline_cpu,
        "baseline": baseline,
        "loader_options": loader_options,
        "zstd_level": level,
        "repeats": repeats,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatrain.data.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path, metavar="DIR")
    p.add_argument("--seq-len", type=int, action="append", help="window bytes (repeatable; default 8192 and 1 MiB)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-bytes", type=int, help="bytes of the split to stream (default all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="ByteStream reading threads")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = p.parse_args(argv)
    for seq_len in args.seq_len or [8192, 1 << 20]:
        try:
            result = loader_benchmark(
                args.data_dir, seq_len, args.split, args.max_bytes, repeats=args.repeats, workers=args.workers
            )
        except ValueError as e:
            p.error(str(e))
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"seq_len {seq_len}, {args.workers} workers, {result['bytes'] / 1e6:.1f} MB: "
                f"loader {result['loader_bytes_per_s'] / 1e6:.0f} MB/s "
                f"(CPU {result['loader_cpu_bytes_per_s'] / 1e6:.0f}), {result['baseline']} "
                f"{result['baseline_bytes_per_s'] / 1e6:.0f} MB/s (CPU {result['baseline_cpu_bytes_per_s'] / 1e6:.0f}), "
                f"ratio {result['ratio']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
