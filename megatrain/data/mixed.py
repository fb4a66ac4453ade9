"""Training batches blended from several sources by weight (`megatrain.data.mixture`)."""

from __future__ import annotations

import functools
import weakref
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from megatrain.data.loader import DEFAULT_BLOCK_BYTES, DEFAULT_GROUP_BLOCKS
from megatrain.data.mixture import Mixture, Source, mixture_change
from megatrain.data.order import EpochOrder, SampleOrder, block_bounds
from megatrain.data.prefetch import Prefetcher
from megatrain.data.stream import SplitStream


class MixedStream:
    """Micro-batches (torch.uint8 [micro_batch_size, seq_len]) of one data-parallel rank,
    drawn from several sources.

    As with `ByteStream`, step s consumes global indices [s * G, (s + 1) * G) counted from
    where the run started or resumed, and rank r takes the r-th contiguous slice of G /
    dp_size: the samples of a step are the same for any dp_size with the same global
    batch. Global index i is sample `Mixture.assign(i)` of its source, whose epochs follow
    one another without end (the mixture has no epochs of its own). The state is one
    number, the global index, so resuming at another dp size continues the same order.

    Samples are read in a background thread, `prefetch` micro-batches ahead; each source's
    windows of a step are read in ascending order, and its epoch plans and shuffle groups
    are cached (a few of each). A source takes its samples in its own order, so it reads
    one shuffle group after another: each source keeps the decoded record batches of about
    one group ((group_blocks + 1) * block_bytes, 80 MiB at the defaults), so that each is
    decoded once per group and rank. `close()` (or `with`) stops the thread.
    """

    def __init__(
        self,
        sources: Sequence[Source],
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
    ):
        if min(seq_len, micro_batch_size, dp_size, global_batch_size) < 1 or seed < 0:
            raise ValueError("seq_len, batch sizes and dp_size must be positive, seed non-negative")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size * "
                             f"dp_size = {micro_batch_size} * {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.sources = list(sources)
        streams, orders = [], []
        for source in self.sources:
            # a source goes through its order one shuffle group at a time: caching a group's
            # record batches decodes each once per group, not once per window
            stream = SplitStream(source.path, split, boundary, on_corrupt,
                                 cache_bytes=max(2 * seq_len, (group_blocks + 1) * block_bytes))
            num_samples = stream.length // seq_len
            if num_samples < 1:
                raise ValueError(f"data source {source.name!r}: the {split!r} split of {source.path} is shorter "
                                 f"than one window of {seq_len} bytes")
            bounds = block_bounds(stream.batch_starts, seq_len, num_samples, block_bytes)
            streams.append(stream)
            orders.append(SampleOrder(stream.fingerprint, seed, bounds, group_blocks))
        self.mixture = Mixture([s.fingerprint for s in self.sources], [s.weight for s in self.sources],
                               [seq_len] * len(self.sources), seed)
        self._reader = _MixedReader(self.mixture, streams, orders, seq_len, global_batch_size, micro_batch_size,
                                    dp_rank, dp_size)
        self.seq_len, self.global_batch_size, self.micro_batch_size = seq_len, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.prefetch = dp_rank, dp_size, seed, prefetch
        self._position = 0
        self._prefetcher: Prefetcher | None = None
        self._finalizer: weakref.finalize | None = None

    def records(self) -> list[dict]:
        return [s.record() for s in self.sources]

    def global_order(self, start: int, stop: int) -> list[tuple[str, int]]:
        """(source name, window index in its split) of the global indices [start, stop)."""
        return [(self.sources[s].name, self._reader.window(s, k)) for s, k in self.mixture.assign(start, stop)]

    def source_bytes(self, start: int, stop: int) -> dict[str, int]:
        """Bytes each source gives the global indices [start, stop)."""
        before, after = self.mixture.taken(start), self.mixture.taken(stop)
        return {s.name: (b - a) * self.seq_len for s, a, b in zip(self.sources, before, after)}

    def last_step_bytes(self) -> dict[str, int]:
        """`source_bytes` of the last complete step handed out."""
        return self.source_bytes(self._position - self.global_batch_size, self._position)

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": self.records(), "seed": self.seed, "samples_consumed": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the mixture and seed must be this one's."""
        if mixture_change(state.get("mixture") or [], self.records()) or state.get("seed") != self.seed:
            raise ValueError(f"data state was saved for mixture {state.get('mixture')!r} (seed {state.get('seed')}), "
                             f"this one is {self.records()!r} (seed {self.seed})")
        position = int(state["samples_consumed"])
        if position < 0:
            raise ValueError(f"invalid data state {state!r}")
        self.close()
        self._position = position

    def __iter__(self) -> "MixedStream":
        return self

    def __next__(self) -> torch.Tensor:
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self._reader.micro_batches(self._position), self.prefetch)
            self._finalizer = weakref.finalize(self, self._prefetcher.close)
        batch, position = self._prefetcher.get()
        if position is not None:
            self._position = position
        return batch

    def corrupt_shards(self) -> dict[str, str]:
        """The corrupt shards of every source whose windows were replaced so far (on_corrupt="skip")."""
        return {path: why for stream in self._reader.streams for path, why in stream.corrupt_shards().items()}

    def close(self) -> None:
        """Stop the thread. Iterating again restarts from the current state."""
        if self._finalizer is not None:
            self._finalizer()
        self._prefetcher = self._finalizer = None

    def __enter__(self) -> "MixedStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MixedReader:
    """One rank's micro-batches, made in the prefetch thread; holds no reference to the
    MixedStream, so that an abandoned one can be collected (which stops the thread)."""

    def __init__(self, mixture: Mixture, streams: list[SplitStream], orders: list[SampleOrder], seq_len: int,
                 global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.mixture, self.streams, self.orders, self.seq_len = mixture, streams, orders, seq_len
        self.global_batch, self.micro_batch, self.dp_rank = global_batch, micro_batch, dp_rank
        self.rank_batch = global_batch // dp_size
        self._epoch = functools.lru_cache(maxsize=8)(self._epoch_order)
        self._group = functools.lru_cache(maxsize=32)(self._group_windows)

    def _epoch_order(self, source: int, epoch: int) -> EpochOrder:
        return self.orders[source].epoch(epoch)

    def _group_windows(self, source: int, epoch: int, group: int) -> np.ndarray:
        return self._epoch(source, epoch).group_windows(group)

    def window(self, source: int, index: int) -> int:
        """The window of the source's sample `index`: position index % N of its epoch index // N."""
        epoch, position = divmod(index, self.orders[source].num_samples)
        plan = self._epoch(source, epoch)
        group = plan.group_of(position)
        return int(self._group(source, epoch, group)[position - plan.group_starts[group]])

    def read(self, start: int, stop: int) -> np.ndarray:
        """The samples of global indices [start, stop), [stop - start, seq_len] uint8."""
        picks = self.mixture.assign(start, stop)
        rows = np.empty((len(picks), self.seq_len), np.uint8)
        for source, stream in enumerate(self.streams):
            slots = np.array([i for i, (s, _) in enumerate(picks) if s == source], np.int64)
            if not len(slots):
                continue
            windows = np.array([self.window(source, picks[i][1]) for i in slots], np.int64)
            by_offset = np.argsort(windows, kind="stable")  # ascending reads decode each record batch once
            out = np.empty((len(slots), self.seq_len), np.uint8)
            failed = stream.read_windows(windows[by_offset], self.seq_len, out)
            for row in np.flatnonzero(failed):  # on_corrupt="skip": stand-ins keep the batch's shape
                self._read_stand_in(source, picks[slots[by_offset[row]]][1], out[row])
            rows[slots[by_offset]] = out
        return rows

    def _read_stand_in(self, source: int, index: int, row: np.ndarray) -> None:
        """Read into `row` the source's first readable sample after its sample `index`: a choice
        that depends on the files alone, so that every layout and resumed run makes it alike."""
        after = (self.window(source, k) for k in range(index + 1, index + 1 + self.orders[source].num_samples))
        if not self.streams[source].read_first_readable(after, self.seq_len, row):
            raise RuntimeError(f"no readable window in source {source}")

    def micro_batches(self, position: int) -> Iterator[tuple[torch.Tensor, int | None]]:
        """(micro-batch, global index after its step, on a step's last micro-batch only)."""
        while True:
            first = position + self.dp_rank * self.rank_batch
            samples = self.read(first, first + self.rank_batch)
            position += self.global_batch
            for i in range(0, self.rank_batch, self.micro_batch):
                last = i + self.micro_batch == self.rank_batch
                yield torch.from_numpy(samples[i:i + self.micro_batch]), position if last else None
