"""Input discovery and document extraction: files and directory trees -> documents.

Every input file is read the same way wherever it is processed, and is named by a
source that does not depend on where the corpus lies (its path relative to the parent
of the input argument), so that the document sequence is a function of the inputs alone.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import zstandard

from data_prep.modalities import AUDIO_SUFFIXES, IMAGE_SUFFIXES, image_bytes, wav_bytes

MODALITIES = ("text", "image", "audio")
COMPRESSION_SUFFIXES = (".zst", ".gz")
DATASET_STATE, DATASET_DICT = "state.json", "dataset_dict.json"  # datasets' save_to_disk folders


@dataclass(frozen=True)
class InputFile:
    path: str
    source: str
    size: int = -1  # bytes on disk when listed (-1: unreadable)
    mtime_ns: int = -1


@dataclass(frozen=True)
class DocOptions:
    modality: str = "text"
    text_field: str = "text"
    image_size: int = 64
    patch_size: int = 192


@dataclass(frozen=True)
class Doc:
    data: bytes
    source: str


@dataclass(frozen=True)
class Skip:
    """An input (file, line or row) that gave no document, and why."""

    source: str
    reason: str


def expand_inputs(inputs: Sequence[str], exclude: Path | None = None) -> list[InputFile]:
    """All files under `inputs`, sorted by source (ties keep argument order).

    Directory symlinks are not followed (no cycles); `exclude` (the output directory)
    is left out so that a build never reads its own shards.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found: list[tuple[str, int, InputFile]] = []
    for position, arg in enumerate(inputs):
        root = Path(arg)
        name = Path(os.path.abspath(arg)).name
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if Path(dirpath, d).resolve() != excluded]
                for filename in _saved_dataset_files(Path(dirpath), filenames):
                    path = Path(dirpath, filename)
                    source = Path(name, path.relative_to(root)).as_posix()
                    found.append((source, position, _listed(path, source)))
        elif root.exists() or root.is_symlink():
            found.append((name, position, _listed(root, name)))
        else:
            raise FileNotFoundError(f"input {arg!r} does not exist")
    found.sort(key=lambda item: item[:2])
    return [f for _, _, f in found]


def _saved_dataset_files(directory: Path, filenames: list[str]) -> list[str]:
    """The files of a folder that hold documents: of a `datasets` `save_to_disk` folder
    (a Dataset's `state.json`, or a DatasetDict's `dataset_dict.json`) only its Arrow
    tables, not the metadata beside them."""
    if DATASET_DICT in filenames:
        return [name for name in filenames if name != DATASET_DICT]
    if DATASET_STATE not in filenames:
        return filenames
    try:
        state = json.loads(Path(directory, DATASET_STATE).read_text())
        return [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory / DATASET_STATE}: not a datasets save_to_disk state ({e})") from None


def _is_saved_dataset_table(path: str) -> bool:
    return path.endswith(".arrow") and Path(path).with_name(DATASET_STATE).is_file()


def _listed(path: Path, source: str) -> InputFile:
    source = source.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # Arrow strings are UTF-8
    try:
        stat = path.stat()
        return InputFile(str(path), source, stat.st_size, stat.st_mtime_ns)
    except OSError:
        return InputFile(str(path), source)  # reported as a skipped input when read


def group_files(files: Sequence[InputFile], group_bytes: int, max_files: int) -> list[range]:
    """Consecutive runs of files of about `group_bytes` (or `max_files` files): the units
    of work, so that many small files do not each cost a task, a part file and a record."""
    groups, start, size = [], 0, 0
    for i, f in enumerate(files):
        size += max(f.size, 0)
        if size >= group_bytes or i + 1 - start >= max_files:
            groups.append(range(start, i + 1))
            start, size = i + 1, 0
    if start < len(files):
        groups.append(range(start, len(files)))
    return groups


def _open(path: str) -> BinaryIO:
    """Open `path` for reading, decompressing .zst and .gz on the fly."""
    if path.endswith(".zst"):  # a file may hold several frames (e.g. written by pzstd)
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _inner_suffix(path: str) -> str:
    """The format suffix under any compression suffix: a.jsonl.zst -> .jsonl."""
    for suffix in COMPRESSION_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return Path(path).suffix.lower()


def read_documents(f: InputFile, options: DocOptions) -> Iterator[Doc | Skip]:
    """The documents of one input file, in file order; problems come out as Skip items."""
    suffix = _inner_suffix(f.path)
    try:
        if options.modality == "image":
            if suffix not in IMAGE_SUFFIXES:
                yield Skip(f.source, f"not an image file ({', '.join(IMAGE_SUFFIXES)})")
                return
            yield Doc(image_bytes(_read_all(f.path), suffix, options.image_size, options.patch_size), f.source)
        elif options.modality == "audio":
            if suffix not in AUDIO_SUFFIXES:
                yield Skip(f.source, "not a .wav file")
                return
            yield Doc(wav_bytes(io.BytesIO(_read_all(f.path))), f.source)
        elif suffix == ".jsonl":
            yield from _jsonl_documents(f, options.text_field)
        elif suffix == ".parquet":
            yield from _parquet_documents(f, options.text_field)
        elif _is_saved_dataset_table(f.path):
            yield from _arrow_documents(f, options.text_field)
        else:
            yield Doc(_read_all(f.path), f.source)  # .txt and any other file: its bytes
    except ImportError:
        raise  # a missing optional dependency (Pillow) is the job's problem, not the file's
    except Exception as e:  # unreadable or undecodable input: reported, counted, skipped
        yield Skip(f.source, f"{type(e).__name__}: {e}")


def _read_all(path: str) -> bytes:
    with _open(path) as stream:
        return stream.read()


def _jsonl_documents(f: InputFile, field: str) -> Iterator[Doc | Skip]:
    with _open(f.path) as stream:
        for number, line in enumerate(io.BufferedReader(stream), start=1):
            if not line.strip():
                continue  # blank lines separate nothing and hold no document
            where = f"{f.source}:{number}"
            try:
                record = json.loads(line)
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    yield Skip(where, f"field {field!r} missing or not a string")
                    continue
                yield Doc(text.encode("utf-8"), where)
            except (ValueError, UnicodeError) as e:
                yield Skip(where, f"invalid JSON line: {e}")


def _parquet_documents(f: InputFile, column: str) -> Iterator[Doc | Skip]:
    import pyarrow.parquet as pq

    source = f.path if not f.path.endswith(COMPRESSION_SUFFIXES) else io.BytesIO(_read_all(f.path))
    yield from _column_documents(f, column, pq.ParquetFile(source).iter_batches(columns=[column]))


def _arrow_documents(f: InputFile, column: str) -> Iterator[Doc | Skip]:
    """A `datasets` save_to_disk table: an Arrow IPC stream (older versions: an IPC file)."""
    import pyarrow as pa

    with pa.memory_map(f.path) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
        if column not in reader.schema.names:
            raise ValueError(f"no column {column!r} (--text-field); columns: {', '.join(reader.schema.names)}")
        batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else (
            reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from _column_documents(f, column, (batch.select([column]) for batch in batches))


def _column_documents(f: InputFile, column: str, batches: Iterator) -> Iterator[Doc | Skip]:
    """One document per row of a table's text (or binary) column."""
    row = 0
    for batch in batches:
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield Doc(value.encode("utf-8"), f"{f.source}[{row}]")
            elif isinstance(value, bytes):
                yield Doc(value, f"{f.source}[{row}]")
            else:
                yield Skip(f"{f.source}[{row}]", f"column {column!r} is {type(value).__name__}, not text")
            row += 1
