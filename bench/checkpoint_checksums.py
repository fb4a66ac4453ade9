"""What recording and verifying checkpoint checksums costs at a model's checkpoint size.

    python bench/checkpoint_checksums.py [--config configs/megabyte-text-1b.yaml] [--dir DIR] [--json]

A bf16 run's checkpoint holds 14 bytes per parameter (bf16 weights, fp32 master copy and
two Adam moments). One file of that size, of random bytes, is written to DIR (fsynced,
as a commit does) and hashed by `megatrain.checkpoint.files.file_checksum` (xxh3_64, the
commit's and `--load`'s hash); the file is removed after. The page cache is left alone,
so the hash reads what the write left cached: a commit's case, which hashes right
after the save.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from megatrain.checkpoint.files import file_checksum
from megatrain.config import load_config
from megatrain.model import Megabyte

BYTES_PER_PARAM = 2 + 4 + 4 + 4
CHUNK = 64 << 20


def checkpoint_bytes(config: str) -> tuple[int, int]:
    with torch.device("meta"):
        params = sum(p.numel() for p in Megabyte(load_config(config).model).parameters())
    return params, params * BYTES_PER_PARAM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/megabyte-text-1b.yaml")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the file (the --save filesystem)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    params, size = checkpoint_bytes(args.config)
    chunk = os.urandom(CHUNK)
    fd, name = tempfile.mkstemp(dir=args.dir, prefix="checksum-bench-")
    path = Path(name)
    try:
        start = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            for offset in range(0, size, CHUNK):
                f.write(chunk[: min(CHUNK, size - offset)])
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        file_checksum(path)
        hash_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    report = {"config": args.config, "params": params, "checkpoint_gb": size / 1e9, "write_s": write_s,
              "hash_s": hash_s, "hash_gb_per_s": size / 1e9 / hash_s, "hash_vs_write": hash_s / write_s,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
