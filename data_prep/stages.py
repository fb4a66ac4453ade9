"""The two stages of a build, as pure functions of their inputs so that any process can run any piece.

1. map: one input file -> per-split *part* files (its documents in file order).
2. write: shard k of a split holds the documents whose start offset in the split's
   stream (all parts in input order) lies in [k * shard_bytes, (k + 1) * shard_bytes).

Which document goes where depends only on the document sequence, never on which
worker or rank handled it: every parallel layout writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep.inputs import DocOptions, InputFile, Skip, read_documents
from megatrain.data.format import (
    RECORD_BATCH_BYTES,
    SPLITS,
    ShardInfo,
    ShardWriter,
    doc_values,
    open_shard,
    sha256_file,
)

PART_ZSTD_LEVEL = 1  # parts are temporary: compress fast


class BadInputError(RuntimeError):
    """A skipped input under --strict."""


@dataclass(frozen=True)
class BuildOptions:
    docs: DocOptions = field(default_factory=DocOptions)
    seed: int = 0
    val_fraction: float = 0.0
    shard_bytes: int = 256 << 20
    zstd_level: int = 3
    batch_bytes: int = RECORD_BATCH_BYTES
    strict: bool = False


def choose_split(doc: bytes, seed: int, val_fraction: float) -> str:
    """A deterministic function of the document's bytes and the seed (equal documents share a split)."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(doc, digest_size=8, key=b"megatrain-split-%d" % seed).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2**64 else "train"


def map_unit(index: int, files: Sequence[InputFile], parts_dir: Path, options: BuildOptions) -> dict:
    """Split the documents of a run of input files into `{index}.{split}.arrow` part files.

    Returns {"parts": {split: {"file", "batches"}}, "skipped": [[source, reason], ...]}.
    """
    writers: dict[str, ShardWriter] = {}
    pending: dict[str, tuple[list[bytes], list[str]]] = {split: ([], []) for split in SPLITS}
    pending_bytes = dict.fromkeys(SPLITS, 0)
    skipped: list[list[str]] = []

    def flush(split: str) -> None:
        docs, sources = pending[split]
        if split not in writers:
            writers[split] = ShardWriter(parts_dir / f"{index:08d}.{split}.arrow.tmp", PART_ZSTD_LEVEL, options.batch_bytes)
        writers[split].add(docs, sources)
        pending[split], pending_bytes[split] = ([], []), 0

    for item in (item for source in files for item in read_documents(source, options.docs)):
        if isinstance(item, Skip):
            if options.strict:
                raise BadInputError(f"{item.source}: {item.reason} (--strict)")
            skipped.append([item.source, item.reason])
            continue
        split = choose_split(item.data, options.seed, options.val_fraction)
        pending[split][0].append(item.data)
        pending[split][1].append(item.source)
        pending_bytes[split] += len(item.data)
        if pending_bytes[split] >= options.batch_bytes:
            flush(split)
    parts = {}
    for split in SPLITS:
        if pending[split][0]:
            flush(split)
        if split in writers:
            name = f"{index:08d}.{split}.arrow"
            parts[split] = {"file": name, "batches": writers[split].close()}
            os.replace(parts_dir / (name + ".tmp"), parts_dir / name)
    return {"parts": parts, "skipped": skipped}


@dataclass(frozen=True)
class ShardTask:
    split: str
    bucket: int
    file: str
    approx_bytes: int
    pieces: tuple[tuple[str, int, int], ...]  # (part file, record batch, stream offset of the batch)


def plan_shards(units: list[dict], shard_bytes: int) -> list[ShardTask]:
    """The shards to write, in manifest order, from the map results of all input files in order."""
    tasks = []
    for split in SPLITS:
        pieces = [
            (part["file"], batch, nbytes)
            for unit in units
            if (part := unit["parts"].get(split))
            for batch, (_, nbytes) in enumerate(part["batches"])
        ]
        if not pieces:
            continue
        sizes = np.array([nbytes for _, _, nbytes in pieces], np.int64)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        total = int(ends[-1])
        # Buckets go one past the end, for empty documents that start exactly at `total`.
        for bucket in range(total // shard_bytes + 1):
            lo, hi = bucket * shard_bytes, (bucket + 1) * shard_bytes
            first, last = np.searchsorted(ends, lo, side="left"), np.searchsorted(starts, hi, side="left")
            if first < last:
                tasks.append(
                    ShardTask(
                        split,
                        bucket,
                        f"{split}-{bucket:05d}.arrow",
                        max(0, min(hi, total) - lo),
                        tuple((pieces[i][0], pieces[i][1], int(starts[i])) for i in range(first, last)),
                    )
                )
    return tasks


def write_shard(task: ShardTask, parts_dir: Path, out_dir: Path, options: BuildOptions) -> dict | None:
    """Write one shard (temporary name, then an atomic rename); None if its bucket holds no document."""
    lo, hi = task.bucket * options.shard_bytes, (task.bucket + 1) * options.shard_bytes
    tmp = out_dir / (task.file + ".tmp")
    readers = {}
    with ShardWriter(tmp, options.zstd_level, options.batch_bytes) as writer:
        for part, index, offset in task.pieces:
            if part not in readers:
                readers[part] = open_shard(parts_dir / part)
            batch = readers[part].get_batch(index)
            doc_offsets, _ = doc_values(batch.column(0))
            starts = offset + doc_offsets[:-1] - doc_offsets[0]
            first, last = (int(i) for i in np.searchsorted(starts, [lo, hi], side="left"))
            if first < last:
                writer.add(batch.column(0).slice(first, last - first), batch.column(1).slice(first, last - first))
    if not writer.batches:
        tmp.unlink()
        return None
    path = out_dir / task.file
    os.replace(tmp, path)
    return ShardInfo(
        file=task.file,
        split=task.split,
        bytes=sum(n for _, n in writer.batches),
        docs=sum(d for d, _ in writer.batches),
        sha256=sha256_file(path),
        batches=tuple(writer.batches),
    ).to_json()
