"""A split as one byte stream with random-access reads, decoding one record batch at a time."""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.ipc as ipc

from megatrain.data.format import CorruptShardError, Manifest, ShardInfo, doc_values, open_shard, read_batch

log = logging.getLogger(__name__)

ON_CORRUPT = ("error", "skip")


class SplitStream:
    """The documents of one split, in manifest order, concatenated into one stream with
    `boundary` appended after every document.

    Reads decode only the record batches they touch (memory-mapped, `bytes` column only)
    and keep the last two decoded batches (more, up to `cache_bytes`), so that reads in
    ascending order decode each batch once. Not thread-safe: use one instance per thread
    (`clone`).
    """

    def __init__(
        self,
        data_dir: Path | str,
        split: str,
        boundary: bytes = b"",
        on_corrupt: str = "error",
        cache_bytes: int = 0,
        max_open_files: int = 64,
    ):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, not {on_corrupt!r}")
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        self.shards: list[ShardInfo] = self.manifest.split_shards(split)
        if not self.shards:
            raise ValueError(f"{self.data_dir} has no {split!r} shards")
        self.boundary = np.frombuffer(bytes(boundary), np.uint8)
        self.on_corrupt = on_corrupt
        table = np.array([(i, j, d, n) for i, s in enumerate(self.shards) for j, (d, n) in enumerate(s.batches)])
        self._batch_shard, self._batch_index, self._batch_docs, self._batch_bytes = table.T.astype(np.int64)
        sizes = self._batch_bytes + self._batch_docs * len(self.boundary)
        # batch_starts[b]: stream offset of record batch b; the last entry is the stream length.
        self.batch_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.length = int(self.batch_starts[-1])
        self._cache_bytes = cache_bytes
        self._max_open_files = max_open_files
        self._reported: dict[str, str] = {}  # corrupt shard -> why, shared by clones: one warning per shard
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._segments: OrderedDict[int, np.ndarray] = OrderedDict()
        self._segment_bytes = 0
        self._readers: OrderedDict[int, ipc.RecordBatchFileReader | CorruptShardError] = OrderedDict()

    def clone(self) -> "SplitStream":
        """The same stream with its own open files and cache, for use in another thread."""
        other = copy.copy(self)
        other._reset_caches()
        return other

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def corrupt_shards(self) -> dict[str, str]:
        """The corrupt shards whose windows were replaced so far (on_corrupt="skip"), and why,
        over this stream and its clones."""
        return dict(self._reported)  # a copy: reading threads may add to it

    def shard_path(self, shard: int) -> Path:
        return self.data_dir / self.shards[shard].file

    def _reader(self, shard: int) -> ipc.RecordBatchFileReader:
        reader = self._readers.pop(shard, None)
        if reader is None:
            try:
                reader = open_shard(self.shard_path(shard), bytes_only=True)
            except CorruptShardError as e:
                reader = e  # remembered, so that a broken file is not reopened for every batch
        self._readers[shard] = reader
        if len(self._readers) > self._max_open_files:
            self._readers.popitem(last=False)
        if isinstance(reader, CorruptShardError):
            raise reader
        return reader

    def segment(self, batch: int) -> np.ndarray:
        """The stream bytes of record batch `batch` (its documents, each followed by the boundary)."""
        cached = self._segments.get(batch)
        if cached is not None:
            self._segments.move_to_end(batch)
        else:
            shard = int(self._batch_shard[batch])
            column = read_batch(
                self._reader(shard),
                self.shard_path(shard),
                int(self._batch_index[batch]),
                int(self._batch_docs[batch]),
                int(self._batch_bytes[batch]),
            )
            cached = self._with_boundaries(*doc_values(column))
            self._segments[batch] = cached
            self._segment_bytes += len(cached)
        # Keep at least two batches: an ascending read needs the previous one for a window that spans both.
        while len(self._segments) > 2 and self._segment_bytes > self._cache_bytes:
            self._segment_bytes -= len(self._segments.popitem(last=False)[1])
        return cached

    def _with_boundaries(self, offsets: np.ndarray, values: np.ndarray) -> np.ndarray:
        docs = values[offsets[0] : offsets[-1]]
        width = len(self.boundary)
        if width == 0:
            return docs  # a view into the decoded Arrow buffer: no copy
        count = len(offsets) - 1
        ends = offsets[1:] - offsets[0] + np.arange(1, count + 1) * width
        is_marker = np.zeros(len(docs) + count * width, bool)
        is_marker[((ends - width)[:, None] + np.arange(width)).ravel()] = True
        out = np.empty(len(is_marker), np.uint8)
        out[is_marker] = np.tile(self.boundary, count)
        out[~is_marker] = docs
        return out

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Copy stream[start : start + len(out)] into `out` (raises CorruptShardError)."""
        if start < 0 or start + len(out) > self.length:
            raise IndexError(f"range [{start}, {start + len(out)}) outside the stream of {self.length} bytes")
        batch = int(np.searchsorted(self.batch_starts, start, side="right")) - 1
        pos, end = start, start + len(out)
        while pos < end:
            segment, base = self.segment(batch), int(self.batch_starts[batch])
            n = min(end, base + len(segment)) - pos
            out[pos - start : pos - start + n] = segment[pos - base : pos - base + n]
            pos += n
            batch += 1

    def read_windows(self, windows: np.ndarray, seq_len: int, out: np.ndarray) -> np.ndarray:
        """Copy window windows[i] (stream[w * seq_len : (w + 1) * seq_len]; ascending) into
        out[i]. Returns a mask of the windows that touch a corrupt shard; with
        on_corrupt="error" such a window raises CorruptShardError instead."""
        failed = np.zeros(len(windows), bool)
        if len(windows) == 0:
            return failed
        starts = windows * seq_len
        first = np.searchsorted(self.batch_starts, starts, side="right") - 1
        last = np.searchsorted(self.batch_starts, starts + seq_len - 1, side="right") - 1
        # Runs of windows inside one batch are copied at once; a window spanning batches
        # is a run of its own (a unique negative key) and is copied piecewise.
        key = np.where(first == last, first, -1 - np.arange(len(windows)))
        edges = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1, [len(windows)]])
        for lo, hi in zip(edges[:-1], edges[1:]):
            try:
                if key[lo] >= 0:
                    segment, base = self.segment(int(key[lo])), int(self.batch_starts[key[lo]])
                    run = windows[lo:hi]
                    first_window, last_window = int(run[0]), int(run[-1])
                    span = segment[first_window * seq_len - base : (last_window + 1) * seq_len - base]
                    span = span.reshape(-1, seq_len)
                    if last_window - first_window == hi - lo - 1:
                        out[lo:hi] = span  # consecutive windows: one contiguous copy
                    else:
                        np.take(span, run - first_window, axis=0, out=out[lo:hi], mode="clip")
                else:
                    self.read_into(int(starts[lo]), out[lo])
            except CorruptShardError as e:
                if self.on_corrupt == "error":
                    raise
                if e.path not in self._reported:
                    self._reported[e.path] = e.reason
                    log.warning("on_corrupt='skip': replacing the windows that touch %s (%s)", e.path, e)
                failed[lo:hi] = True
        return failed

    def read_first_readable(self, windows: Iterable[int], seq_len: int, row: np.ndarray) -> bool:
        """Copy the first window of `windows` that touches no corrupt shard into `row`
        (on_corrupt="skip": a stand-in); False if none is readable."""
        return any(not self.read_windows(np.array([w]), seq_len, row[None]).any() for w in windows)


def read_split(data_dir: Path | str, split: str, max_bytes: int | None = None, boundary: bytes = b"") -> np.ndarray:
    """The first `max_bytes` bytes (default all) of a split's stream, in memory, as uint8."""
    stream = SplitStream(data_dir, split, boundary)
    out = np.empty(stream.length if max_bytes is None else min(max_bytes, stream.length), np.uint8)
    stream.read_into(0, out)
    return out
