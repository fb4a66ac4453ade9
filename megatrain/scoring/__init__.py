"""Bits per byte of a model on a byte stream, as the paper measures it: the one scoring
code that `python -m megatrain.evaluate`, training's validation and other tools share.

Every byte of the stream is predicted exactly once, from a window of at most seq_len
bytes that starts on a patch boundary:
- plain: consecutive windows of seq_len bytes;
- sliding (stride W): windows advance by W bytes and each scores only the bytes the
  previous ones did not, so every byte after the first window sees seq_len - W
  bytes of context or more;
- strided (Section 2.3.3): a second pass with windows offset by P/2; each pass
  keeps the predictions of the first half of every patch, where the paper's models
  are best (loss grows along a patch as the weaker local model does more of the work).

This module runs a model on one device (`bits_per_byte`); `megatrain.scoring.pipeline`
runs the same windows through the pipeline engine.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # bytes [B, T] -> logits [B, T, 256]
UNSCORED = -100  # a target no prediction is scored on: cross_entropy's ignore_index


@dataclass(frozen=True)
class Window:
    start: int  # first byte of the window in the stream
    length: int
    score: np.ndarray  # bool [length]: which of its predictions count


def plan_windows(n_bytes: int, seq_len: int, patch_size: int, strided: bool = False,
                 sliding: int | None = None) -> Iterator[Window]:
    """The windows that together predict each of n_bytes bytes exactly once."""
    stride = sliding or seq_len
    if stride % patch_size or not 0 < stride <= seq_len:
        raise ValueError(f"sliding stride {stride} must be a multiple of the patch size "
                         f"{patch_size} in (0, seq_len={seq_len}]")
    half = patch_size // 2
    for offset in ((0, half) if strided else (0,)):
        covered = offset
        for start in range(offset, n_bytes, stride):
            length = min(seq_len, n_bytes - start)
            position = np.arange(length)
            score = start + position >= covered
            if strided:
                score &= position % patch_size < half
            covered = start + length
            if score.any():
                yield Window(start, length, score)
            if covered == n_bytes:
                break


def scored_windows(data: np.ndarray, seq_len: int, patch_size: int, strided: bool = False,
                   sliding: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(bytes, targets) per window of `plan_windows`, both [seq_len] int64: a short last
    window is padded, and targets the window does not score (padding included) are UNSCORED.
    Fixed shapes let the pipeline engine run them as they are; a causal model's scored
    predictions do not see the padding after them."""
    for w in plan_windows(len(data), seq_len, patch_size, strided, sliding):
        x = torch.zeros(seq_len, dtype=torch.int64)
        x[:w.length] = torch.from_numpy(data[w.start:w.start + w.length].astype(np.int64))
        targets = torch.full((seq_len,), UNSCORED, dtype=torch.int64)
        score = torch.from_numpy(w.score)
        targets[:w.length][score] = x[:w.length][score]
        yield x, targets


def scored_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats summed (in float64) over the scored targets (the others are UNSCORED)."""
    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=UNSCORED, reduction="none")
    return nats.double().sum()


def summary(nats: float, scored_bytes: int) -> dict:
    return {"bpb": nats / max(scored_bytes, 1) / math.log(2), "bytes": scored_bytes, "nats": nats}


def pooled(results: Iterable[dict]) -> dict:
    """The `summary` of several streams scored apart, as one: bits per byte weighted by their bytes."""
    results = list(results)
    return summary(sum(r["nats"] for r in results), sum(r["bytes"] for r in results))


def bits_per_byte(logits_fn: LogitsFn, data: np.ndarray, seq_len: int, patch_size: int,
                  strided: bool = False, sliding: int | None = None, batch_size: int = 8,
                  device: str | torch.device = "cpu") -> dict:
    """{"bpb", "bytes", "nats"} of the byte array `data` under the model."""
    total_nats, total_bytes = 0.0, 0
    windows = scored_windows(data, seq_len, patch_size, strided, sliding)
    while batch := list(itertools.islice(windows, batch_size)):
        x, targets = (torch.stack(t).to(device) for t in zip(*batch))
        with torch.no_grad():
            total_nats += scored_nats(logits_fn(x), targets).item()
        total_bytes += int((targets != UNSCORED).sum())
    if total_bytes != len(data):
        raise AssertionError(f"scored {total_bytes} of {len(data)} bytes")
    return summary(total_nats, total_bytes)
