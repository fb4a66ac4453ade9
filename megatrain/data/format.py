"""The dataset format, in one place: shard schema, manifest, path safety and integrity checks.

A dataset directory holds ``manifest.json`` and shard files. A shard is an Arrow IPC
file (zstd buffer compression) with one row per document: ``bytes`` (the document's
exact bytes) and ``source`` (where it came from). Shards are written in record batches
of about ``RECORD_BATCH_BYTES`` so that readers can decode a small part of a shard at
a time; the manifest records each batch's document and byte counts, which lets the
loader map a byte offset of a split's stream to a record batch without opening files.

Both ``data_prep`` (writer) and ``megatrain.data`` (reader) import this module; it
imports neither model nor training code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
SCHEMA = pa.schema(
    [pa.field("bytes", pa.large_binary(), nullable=False), pa.field("source", pa.string(), nullable=False)]
)
# 1 MiB batches decode in about a millisecond, small enough for random access, large
# enough that per-batch overhead and zstd frame overhead stay in the noise.
RECORD_BATCH_BYTES = 1 << 20


class FormatError(ValueError):
    """The manifest is missing, malformed or unsafe."""


class CorruptShardError(RuntimeError):
    """A shard file does not decode or does not match its manifest entry."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"corrupt shard {path}: {reason}")
        self.path, self.reason = str(path), reason


def safe_relative_path(name: str) -> str:
    """Return `name` if it names a file inside the dataset directory, else raise FormatError."""
    posix = PurePosixPath(name)
    if not name or "\\" in name or posix.is_absolute() or ".." in posix.parts or name != str(posix):
        raise FormatError(f"unsafe shard path {name!r}: must be a plain relative path inside the data directory")
    return name


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _require(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FormatError(f"{where}: field {key!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


@dataclass(frozen=True)
class ShardInfo:
    """One manifest entry. `batches` holds (docs, bytes) per record batch, in file order."""

    file: str
    split: str
    bytes: int
    docs: int
    sha256: str
    batches: tuple[tuple[int, int], ...]

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "split": self.split,
            "bytes": self.bytes,
            "docs": self.docs,
            "sha256": self.sha256,
            "batches": [list(b) for b in self.batches],
        }

    @classmethod
    def from_json(cls, obj: Any) -> "ShardInfo":
        if not isinstance(obj, dict):
            raise FormatError(f"shard entry is not an object: {obj!r}")
        where = f"shard {obj.get('file')!r}"
        info = cls(
            file=safe_relative_path(_require(obj, "file", str, where)),
            split=_require(obj, "split", str, where),
            bytes=_require(obj, "bytes", int, where),
            docs=_require(obj, "docs", int, where),
            sha256=_require(obj, "sha256", str, where),
            batches=tuple(tuple(b) if isinstance(b, list) else () for b in _require(obj, "batches", list, where)),
        )
        if info.split not in SPLITS:
            raise FormatError(f"{where}: split {info.split!r} is not one of {SPLITS}")
        valid = all(len(b) == 2 and all(isinstance(n, int) and n >= 0 for n in b) and b[0] for b in info.batches)
        if not info.batches or not valid:
            raise FormatError(f"{where}: batches must be a non-empty list of [docs > 0, bytes >= 0] pairs")
        if sum(b[0] for b in info.batches) != info.docs or sum(b[1] for b in info.batches) != info.bytes:
            raise FormatError(f"{where}: batch counts do not add up to docs={info.docs} bytes={info.bytes}")
        return info


def compute_fingerprint(shards: Sequence[ShardInfo]) -> str:
    """Identity of a dataset's content: changes whenever any shard's bytes or order change."""
    table = [[s.file, s.split, s.docs, s.bytes, s.sha256] for s in shards]
    canonical = json.dumps({"format_version": FORMAT_VERSION, "shards": table}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: shards in stream order, plus how many input documents were skipped."""

    shards: tuple[ShardInfo, ...]
    skipped: int = 0
    skipped_examples: tuple[dict, ...] = ()
    build: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return compute_fingerprint(self.shards)

    def split_shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "shards": [s.to_json() for s in self.shards],
            "skipped": self.skipped,
            "skipped_examples": list(self.skipped_examples),
            "build": self.build,
        }

    def save(self, data_dir: Path | str) -> None:
        """Write atomically, so that a reader never sees half a manifest."""
        path = Path(data_dir) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(_dump_one_item_per_line(self.to_json()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, data_dir: Path | str) -> "Manifest":
        path = Path(data_dir) / MANIFEST_NAME
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"cannot read {path}: {e}") from e
        if not isinstance(obj, dict):
            raise FormatError(f"{path}: not a JSON object")
        if obj.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"{path}: format_version {obj.get('format_version')!r}, expected {FORMAT_VERSION}")
        manifest = cls(
            shards=tuple(ShardInfo.from_json(s) for s in _require(obj, "shards", list, str(path))),
            skipped=_require(obj, "skipped", int, str(path)),
            skipped_examples=tuple(obj.get("skipped_examples", ())),
            build=obj.get("build", {}),
        )
        if len({s.file for s in manifest.shards}) != len(manifest.shards):
            raise FormatError(f"{path}: a shard file is listed twice")
        if _require(obj, "fingerprint", str, str(path)) != manifest.fingerprint:
            raise FormatError(f"{path}: fingerprint does not match the shard list (edited or damaged manifest)")
        return manifest


def _dump_one_item_per_line(obj: dict) -> str:
    """JSON with one top-level key, and one shard, per line: readable and still compact."""
    def dump(value: Any) -> str:
        if isinstance(value, list) and value:
            return "[\n  " + ",\n  ".join(json.dumps(v) for v in value) + "\n ]"
        return json.dumps(value)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {dump(v)}" for k, v in obj.items()) + "\n}\n"


class ShardWriter:
    """Writes documents to one shard file, cutting a record batch right after the
    document that brings it to `batch_bytes` or more. The cut depends only on the
    document sequence, so the same documents always give the same file."""

    def __init__(self, path: Path | str, zstd_level: int, batch_bytes: int = RECORD_BATCH_BYTES):
        options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=zstd_level))
        if batch_bytes <= 0:
            raise ValueError("batch_bytes must be positive")
        self._writer = ipc.new_file(str(path), SCHEMA, options=options)
        self._batch_bytes = batch_bytes
        self._pending: list[tuple[pa.Array, pa.Array]] = []
        self._pending_bytes = 0
        self.batches: list[tuple[int, int]] = []

    def add(self, docs: pa.Array | Sequence[bytes], sources: pa.Array | Sequence[str]) -> None:
        docs = docs if isinstance(docs, pa.Array) else pa.array(docs, pa.large_binary())
        sources = sources if isinstance(sources, pa.Array) else pa.array(sources, pa.string())
        offsets, _ = doc_values(docs)
        # ends[i]: pending bytes once docs[i] is added; cut where that reaches the target.
        ends = offsets[1:] - offsets[0] + self._pending_bytes
        start = 0
        while start < len(docs):
            # Entries before `start` are <= 0 after the shift below, so the search lands at or after it.
            stop = int(np.searchsorted(ends, self._batch_bytes, side="left")) + 1
            if stop > len(docs):
                self._pending.append((docs.slice(start), sources.slice(start)))
                self._pending_bytes = int(ends[-1])
                return
            self._pending.append((docs.slice(start, stop - start), sources.slice(start, stop - start)))
            self._pending_bytes = int(ends[stop - 1])
            self._flush()
            ends = ends - ends[stop - 1]
            start = stop

    def _flush(self) -> None:
        if not self._pending:
            return
        docs = pa.concat_arrays([d.cast(pa.large_binary()) for d, _ in self._pending])
        sources = pa.concat_arrays([s.cast(pa.string()) for _, s in self._pending])
        self._writer.write_batch(pa.record_batch([docs, sources], schema=SCHEMA))
        self.batches.append((len(docs), self._pending_bytes))
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[tuple[int, int]]:
        """Finish the file; returns (docs, bytes) per record batch."""
        self._flush()
        self._writer.close()
        return self.batches

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._writer.close()


def open_shard(path: Path | str, bytes_only: bool = False) -> ipc.RecordBatchFileReader:
    """Open a shard memory-mapped; with `bytes_only`, batches decode only the `bytes` column."""
    options = ipc.IpcReadOptions(included_fields=[0] if bytes_only else None, use_threads=False)
    try:
        reader = ipc.open_file(pa.memory_map(str(path)), options=options)
    except (OSError, pa.ArrowException) as e:
        raise CorruptShardError(path, str(e)) from e
    if reader.schema.names[:1] != ["bytes"] or not _is_binary(reader.schema.field(0).type):
        raise CorruptShardError(path, f"unexpected schema {reader.schema}")
    return reader


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_large_binary(kind) or pa.types.is_binary(kind)


def doc_values(docs: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy views of a binary array: its offsets (int64, len+1) and its value bytes."""
    _, offsets_buf, values_buf = docs.buffers()
    offset_type = np.int64 if pa.types.is_large_binary(docs.type) else np.int32
    offsets = np.frombuffer(offsets_buf, offset_type)[docs.offset : docs.offset + len(docs) + 1].astype(np.int64)
    values = np.frombuffer(values_buf, np.uint8) if values_buf is not None else np.empty(0, np.uint8)
    return offsets, values


def read_batch(reader: ipc.RecordBatchFileReader, path: Path | str, index: int, docs: int, nbytes: int) -> pa.Array:
    """Decode record batch `index` and check it against the manifest's counts."""
    try:
        column = reader.get_batch(index).column(0)
    except (OSError, pa.ArrowException) as e:
        raise CorruptShardError(path, f"record batch {index}: {e}") from e
    offsets, values = doc_values(column)
    got_bytes = int(offsets[-1] - offsets[0])
    if len(column) != docs or got_bytes != nbytes or column.null_count or offsets[-1] > len(values):
        raise CorruptShardError(
            path, f"record batch {index} has {len(column)} docs / {got_bytes} bytes, manifest says {docs} / {nbytes}"
        )
    return column
