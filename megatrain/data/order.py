"""The global sample order: a pure function of (fingerprint, seed, epoch, index).

A split's stream is cut into `num_samples` windows of `seq_len` bytes (the tail shorter
than a window is not used). The order of an epoch is a two-level shuffle:

1. The windows are grouped into *blocks* of consecutive windows. A block starts at a
   record-batch boundary of the shards and spans about `block_bytes` (at least one
   window). The blocks of the whole split, across all shards, are permuted.
2. Each *group* of `group_blocks` consecutive blocks of that permutation has its
   windows permuted among themselves.

The trade-off is decoding work against randomness. Reading a block decodes its
record batches plus the one its last window runs into, so the decoded bytes per
delivered byte are about 1 + batch_bytes / block_bytes (1.06 for 16 MiB blocks of 1 MiB
batches): a fully random order of 8 KiB windows would decode a 1 MiB batch per 8 KiB
window instead. A loader holds one group in memory (group_blocks * block_bytes, e.g.
4 x 16 MiB), and a global batch mixes windows from `group_blocks` distant places of the
corpus; consecutive groups come from unrelated blocks. Blocks aligned to record batches
also mean that a document larger than a block (one big file) is decoded once per epoch,
not once per window range.

Permutations come from a 64-bit hash of (key, item) sorted with a stable sort, keyed by
sha256 of (fingerprint, seed, epoch): they do not depend on numpy's random generators
and are the same on every machine and version.
"""

from __future__ import annotations

import hashlib

import numpy as np


def mix64(values: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of values + key: a fast, well-mixed 64-bit hash of each element."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def derive_key(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def keyed_permutation(items: np.ndarray, key: int) -> np.ndarray:
    return items[np.argsort(mix64(items, key), kind="stable")]


def block_bounds(batch_starts: np.ndarray, seq_len: int, num_samples: int, block_bytes: int) -> np.ndarray:
    """Window index where each block starts, plus `num_samples` at the end.

    A block opens at the first record batch that starts in each `block_bytes` stretch of
    the stream (block_bytes is raised to seq_len) and owns the windows starting in it.
    """
    stretch = max(block_bytes, seq_len)
    batch_starts = batch_starts[:-1]
    opening = batch_starts[np.flatnonzero(np.diff(batch_starts // stretch, prepend=-1))]
    first_window = -(-opening // seq_len)
    # Blocks in which no window starts disappear here.
    return np.unique(np.append(np.minimum(first_window, num_samples), num_samples))


class SampleOrder:
    """Maps (epoch, position) to a window index; see the module docstring. Immutable."""

    def __init__(self, fingerprint: str, seed: int, bounds: np.ndarray, group_blocks: int):
        if group_blocks < 1:
            raise ValueError("group_blocks must be >= 1")
        self.fingerprint, self.seed, self.group_blocks = fingerprint, seed, group_blocks
        self.bounds = bounds
        self.num_samples = int(bounds[-1])

    def epoch(self, epoch: int) -> "EpochOrder":
        return EpochOrder(self, epoch)

    def windows(self, epoch: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Window indices at positions [start, stop) of `epoch`."""
        stop = self.num_samples if stop is None else stop
        if stop <= start:
            return np.empty(0, np.int64)
        plan = self.epoch(epoch)
        first, last = plan.group_of(start), plan.group_of(max(stop - 1, start))
        parts = [plan.group_windows(g) for g in range(first, last + 1)]
        offset = start - int(plan.group_starts[first])
        return np.concatenate(parts)[offset : offset + stop - start]


class EpochOrder:
    """One epoch's block permutation; a group's window order is computed on demand."""

    def __init__(self, order: SampleOrder, epoch: int):
        self.order, self.epoch = order, epoch
        counts = np.diff(order.bounds)
        self.blocks = keyed_permutation(np.arange(len(counts)), derive_key(order.fingerprint, order.seed, epoch))
        group_sizes = np.add.reduceat(counts[self.blocks], np.arange(0, len(counts), order.group_blocks))
        # group_starts[g]: position of group g's first sample in the epoch.
        self.group_starts = np.concatenate([[0], np.cumsum(group_sizes)])
        self._window_key = derive_key(order.fingerprint, order.seed, epoch, "windows")

    def group_of(self, position: int) -> int:
        if not 0 <= position < self.order.num_samples:
            raise IndexError(f"position {position} outside the epoch of {self.order.num_samples} samples")
        return int(np.searchsorted(self.group_starts, position, side="right")) - 1

    def group_windows(self, group: int) -> np.ndarray:
        blocks = self.blocks[group * self.order.group_blocks : (group + 1) * self.order.group_blocks]
        bounds = self.order.bounds
        windows = np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in blocks])
        return keyed_permutation(windows, self._window_key)
