"""Helpers for the data tests: generated corpora, builds, and an independent reader
of shards (plain pyarrow) to check data_prep and the loader against."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.ipc as ipc

from data_prep import build_shards

MPIRUN = Path(sys.executable).parent / "mpirun"
WORDS = "the of and to in is was for on that with byte patch model global local stream shard".split()


def write_text_corpus(root: Path, files: int, mean_bytes: int, seed: int = 0) -> Path:
    """Deterministic pseudo-text files of varied sizes under root/corpus."""
    rng = random.Random(seed)
    corpus = root / "corpus"
    for i in range(files):
        size = rng.randint(mean_bytes // 4, mean_bytes * 7 // 4)
        words = rng.choices(WORDS, k=size // 4)  # the mean word with its separator is about 4.5 bytes
        separators = rng.choices(" \n", weights=(9, 1), k=len(words))
        path = corpus / f"dir{i % 3}" / f"file{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes("".join(w + s for w, s in zip(words, separators)).encode())
    return corpus


def build(inputs: list[Path], output: Path, *options: str) -> int:
    """build_shards in this process (subprocess tests launch it themselves)."""
    return build_shards.main([*map(str, inputs), "--output", str(output), *options])


def shard_docs(data_dir: Path, split: str | None = None) -> list[tuple[str, bytes]]:
    """(source, bytes) of every document, in manifest order, read with plain pyarrow."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    docs = []
    for shard in manifest["shards"]:
        if split in (None, shard["split"]):
            table = ipc.open_file(pa.memory_map(str(data_dir / shard["file"]))).read_all()
            docs.extend(zip(table.column("source").to_pylist(), table.column("bytes").to_pylist()))
    return docs


def split_stream(data_dir: Path, split: str, boundary: bytes = b"") -> bytes:
    return b"".join(doc + boundary for _, doc in shard_docs(data_dir, split))


def copy_dataset(dataset: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return copy


def edit_manifest(data_dir: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    change(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def shard_files(data_dir: Path) -> list[str]:
    return [s["file"] for s in json.loads((data_dir / "manifest.json").read_text())["shards"]]


def dataset_files(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file()}


# Small enough to build in a second, with many shards and record batches per shard.
SMALL_OPTIONS = ("--shard-bytes", "65536", "--batch-bytes", "4096", "--val-fraction", "0.2", "--seed", "7")
