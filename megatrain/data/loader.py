"""Streaming loaders over a sharded dataset: shuffled training batches and in-order evaluation windows."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from megatrain.data.order import EpochOrder, SampleOrder, block_bounds
from megatrain.data.prefetch import Prefetcher
from megatrain.data.stream import SplitStream

DEFAULT_BLOCK_BYTES = 16 << 20
DEFAULT_GROUP_BLOCKS = 4


class ByteStream:
    """Micro-batches (torch.uint8 tensors [micro_batch_size, seq_len]) of one data-parallel rank.

    Step s of training consumes positions [s * G, (s + 1) * G) of the global order
    (G = global_batch_size = micro_batch_size * grad_accum * dp_size, counted from the
    position the run started or resumed at); rank r takes the r-th contiguous slice of
    G / dp_size samples as grad_accum micro-batches. The samples of a step are therefore
    the same for any dp_size with the same global batch. An epoch ends when fewer than
    G samples are left (they are not used in that epoch); the next epoch is a new
    permutation. See `megatrain.data.order` for the order itself.

    Tensor-parallel peers pass the same dp_rank and get identical batches. Nothing is
    read before the first `next()`, so pipeline stages that need no data can skip
    iterating (or never build one).

    Batches are prepared in the background: `workers` threads read the next shuffle
    groups (block_bytes and group_blocks set the shuffle; see `megatrain.data.order`)
    while a prefetch thread keeps up to `prefetch` micro-batches ready. One worker
    delivers over 80% of the rate of `zstd -d` (docs/PERFORMANCE.md); more help only
    where cores are idle. Memory is bounded, whatever the corpus size, by about
    (workers + 3) group buffers of group_blocks * block_bytes / dp_size bytes, two or
    three decoded record batches per worker, and the prefetched micro-batches. Call
    `close()` (or use `with`) to stop the threads; an abandoned ByteStream stops them
    when it is collected.

    `on_corrupt="error"` raises CorruptShardError naming the shard; `"skip"` logs a
    warning and replaces the affected windows with other windows of the same group.
    Reads catch what breaks decoding or the manifest's counts (truncation, damaged
    metadata or frames); a flipped bit inside compressed data can decode silently,
    as Arrow's zstd frames carry no checksum: `python -m data_prep.verify` checks sha256.
    """

    def __init__(
        self,
        data_dir: Path | str,
        split: str,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        boundary: bytes = b"",
        on_corrupt: str = "error",
        prefetch: int = 4,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        group_blocks: int = DEFAULT_GROUP_BLOCKS,
        workers: int = 1,
    ):
        if min(seq_len, micro_batch_size, dp_size, global_batch_size, workers) < 1 or seed < 0:
            raise ValueError("seq_len, batch sizes, dp_size and workers must be positive, seed non-negative")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size * dp_size "
                f"= {micro_batch_size} * {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        stream = SplitStream(data_dir, split, boundary, on_corrupt, cache_bytes=2 * seq_len)
        num_samples = stream.length // seq_len
        if num_samples < global_batch_size:
            raise ValueError(
                f"the {split!r} split of {data_dir} has {num_samples} windows of {seq_len} bytes, "
                f"fewer than one global batch of {global_batch_size}"
            )
        bounds = block_bounds(stream.batch_starts, seq_len, num_samples, block_bytes)
        self._order = SampleOrder(stream.fingerprint, seed, bounds, group_blocks)
        self._reader = _RankReader(
            stream, self._order, seq_len, global_batch_size, micro_batch_size, dp_rank, dp_size, workers
        )
        self.seq_len, self.global_batch_size, self.micro_batch_size = seq_len, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.prefetch = dp_rank, dp_size, seed, prefetch
        self._epoch, self._position = 0, 0
        self._prefetcher: Prefetcher | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def fingerprint(self) -> str:
        return self._order.fingerprint

    @property
    def num_samples(self) -> int:
        """Windows per epoch."""
        return self._order.num_samples

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def global_order(self, epoch: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Window indices (window w = stream bytes [w * seq_len, (w + 1) * seq_len)) at positions [start, stop)."""
        return self._order.windows(epoch, start, stop)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last micro-batch of the last complete step handed out."""
        return {
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "epoch": self._epoch,
            "samples_consumed": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, including its seed; the dataset must be the same one."""
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"data state was saved for dataset fingerprint {state.get('fingerprint')!r}, but this "
                f"dataset's fingerprint is {self.fingerprint!r}: the shards differ, so the position cannot be restored"
            )
        epoch, position, seed = int(state["epoch"]), int(state["samples_consumed"]), int(state["seed"])
        if epoch < 0 or not 0 <= position <= self.num_samples or seed < 0:
            raise ValueError(f"invalid data state {state!r} for {self.num_samples} samples per epoch")
        self.close()
        if seed != self.seed:
            self._order = SampleOrder(self.fingerprint, seed, self._order.bounds, self._order.group_blocks)
            self._reader.order, self.seed = self._order, seed
        self._epoch, self._position = epoch, position

    def __iter__(self) -> "ByteStream":
        return self

    def __next__(self) -> torch.Tensor:
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self._reader.micro_batches(self._epoch, self._position), self.prefetch)
            self._finalizer = weakref.finalize(self, self._prefetcher.close)
        batch, state = self._prefetcher.get()
        if state is not None:
            self._epoch, self._position = state
        return batch

    def corrupt_shards(self) -> dict[str, str]:
        """The corrupt shards whose windows were replaced so far (on_corrupt="skip"), and why."""
        return self._reader.stream.corrupt_shards()

    def close(self) -> None:
        """Stop the threads. Iterating again restarts from the current state."""
        if self._finalizer is not None:
            self._finalizer()  # closes the prefetcher once, here or at garbage collection / exit
        self._prefetcher = self._finalizer = None

    def __enter__(self) -> "ByteStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Group(NamedTuple):
    """This rank's samples of one shuffle group: the sample at positions[i] is rows[slots[i]]
    (rows are in stream order, the order they were read in; `buffer` holds them)."""

    epoch: int
    start: int  # first position of the group
    stop: int
    positions: np.ndarray
    slots: np.ndarray
    rows: np.ndarray
    buffer: np.ndarray


class _BufferPool:
    """Reuses group buffers: a fresh allocation of tens of MiB costs a page fault per
    4 KiB on first touch. Buffers get 1/8 headroom so that the next, slightly larger
    group still fits; at most `capacity` idle buffers are kept."""

    def __init__(self, capacity: int):
        self._free: list[np.ndarray] = []
        self._capacity = capacity
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) >= nbytes:
                    return self._free.pop(i)
        return np.empty(nbytes + nbytes // 8, np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self._capacity:
                del self._free[min(range(len(self._free)), key=lambda i: len(self._free[i]))]


class _RankReader:
    """Produces one rank's micro-batches in the prefetch thread, with `workers` threads
    reading the next shuffle groups ahead. Holds no reference to the ByteStream, so
    that an abandoned ByteStream can be collected (which stops the threads)."""

    def __init__(
        self,
        stream: SplitStream,
        order: SampleOrder,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        workers: int,
    ):
        self.stream, self.order, self.seq_len = stream, order, seq_len
        self.global_batch, self.micro_batch, self.dp_rank = global_batch, micro_batch, dp_rank
        self.rank_batch = global_batch // dp_size
        self.workers = workers
        self._local = threading.local()  # a SplitStream per reading thread: its caches are not shared
        self._buffers = _BufferPool(capacity=2)

    def micro_batches(self, epoch: int, position: int) -> Iterator[tuple[torch.Tensor, tuple[int, int] | None]]:
        """Yields (micro-batch, state after it); the state is set on the last micro-batch of a step."""
        groups = _ordered_map(self._load_group, self._group_jobs(epoch, position), self.workers)
        try:
            group = next(groups)
            while True:
                if self.order.num_samples - position < self.global_batch:
                    epoch, position = epoch + 1, 0
                start, count, parts = position + self.dp_rank * self.rank_batch, self.rank_batch, []
                while count:
                    while (group.epoch, group.stop) <= (epoch, start):
                        self._buffers.give(group.buffer)  # its samples were copied out
                        group = next(groups)
                    first = int(np.searchsorted(group.positions, start))
                    n = min(count, group.stop - start)
                    parts.append(group.rows[group.slots[first : first + n]])
                    start, count = start + n, count - n
                samples = parts[0] if len(parts) == 1 else np.concatenate(parts)  # a copy: groups get freed
                position += self.global_batch
                for i in range(0, self.rank_batch, self.micro_batch):
                    last = i + self.micro_batch == self.rank_batch
                    yield torch.from_numpy(samples[i : i + self.micro_batch]), (epoch, position) if last else None
        finally:
            groups.close()

    def _group_jobs(self, epoch: int, origin: int) -> Iterator[tuple[EpochOrder, int, int, int]]:
        """(epoch order, first step position, end of the last full step, group) of every group
        that the steps from `origin` on touch; later epochs start at 0."""
        while True:
            plan = self.order.epoch(epoch)
            steps = (self.order.num_samples - origin) // self.global_batch
            end = origin + steps * self.global_batch
            if steps:
                for group in range(plan.group_of(origin), plan.group_of(end - 1) + 1):
                    yield plan, origin, end, group
            epoch, origin = epoch + 1, 0

    def _load_group(self, job: tuple[EpochOrder, int, int, int]) -> _Group:
        """Read this rank's windows of a group, in position order."""
        plan, origin, end, group = job
        group_start, group_stop = int(plan.group_starts[group]), int(plan.group_starts[group + 1])
        positions = np.arange(max(group_start, origin), min(group_stop, end))
        positions = positions[(positions - origin) % self.global_batch // self.rank_batch == self.dp_rank]
        windows = plan.group_windows(group)[positions - group_start]
        by_offset = np.argsort(windows)  # ascending reads decode each record batch once
        slots = np.empty(len(windows), np.int64)
        slots[by_offset] = np.arange(len(windows))
        if not hasattr(self._local, "stream"):
            self._local.stream = self.stream.clone()
        buffer = self._buffers.take(len(windows) * self.seq_len)
        rows = buffer[: len(windows) * self.seq_len].reshape(len(windows), self.seq_len)
        failed = self._local.stream.read_windows(windows[by_offset], self.seq_len, rows)
        for row in np.flatnonzero(failed):  # on_corrupt="skip": stand-ins keep batch shapes and positions
            self._read_stand_in(plan, group, int(positions[by_offset[row]]) - group_start, rows[row])
        return _Group(plan.epoch, group_start, group_stop, positions, slots, rows, buffer)

    def _read_stand_in(self, plan: EpochOrder, group: int, index: int, row: np.ndarray) -> None:
        """Read into `row` the first readable window after the group's index-th one (cyclic):
        a choice that depends on the files alone, not on the rank or where the run started,
        so that every layout and every resumed run replaces a corrupt window alike."""
        group_windows = plan.group_windows(group)
        after = (group_windows[(index + k) % len(group_windows)] for k in range(1, len(group_windows)))
        if not self._local.stream.read_first_readable(after, self.seq_len, row):
            raise RuntimeError(f"no readable window in shuffle group {group} of epoch {plan.epoch}")


def _ordered_map(function: Callable[[Any], Any], items: Iterator[Any], threads: int) -> Iterator[Any]:
    """function(item) for each item, computed by `threads` threads at most `threads` items
    ahead of the consumer, yielded in order. Closing the generator stops the threads."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="megatrain-read") as pool:
        pending = deque(pool.submit(function, item) for item in itertools.islice(items, threads))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(function, item) for item in itertools.islice(items, 1))
                yield result
        finally:
            for future in pending:
                future.cancel()
