"""Bits per byte of a model on a byte stream, as the paper measures it.

    python -m megatrain.evaluate --load MODEL --data DIR [--split val] [--max-bytes N]
        [--strided] [--sliding W]
    deepspeed --num_gpus 8 --module megatrain.evaluate --load CKPT --data DIR --pp 2 --tp 4 ...

Every byte of the stream is predicted exactly once, from a window of at most seq_len
bytes that starts on a patch boundary:
- plain: consecutive windows of seq_len bytes;
- `--sliding W`: windows advance by W bytes and each scores only the bytes the
  previous ones did not, so every byte after the first window sees seq_len - W
  bytes of context or more;
- `--strided` (Section 2.3.3): a second pass with windows offset by P/2; each pass
  keeps the predictions of the first half of every patch, where the paper's models
  are best (loss grows along a patch as the weaker local model does more of the work).
Both can be combined (the paper's best PG-19 figure). The last line printed is a JSON
object with `bpb` and `bytes`.

MODEL is an exported .pt or a checkpoint of any layout, run as the reference model on
one device; under a launcher (or with --pp / --tp) a checkpoint runs as the parallel
model instead, for models one device cannot hold (`megatrain.train.validation`, which
training's validation runs too, on the same `scored_windows`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

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


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from megatrain.data import read_split
    from megatrain.reference import load_reference
    from megatrain.train.distributed import discover_launcher, leave_process_group

    parser = argparse.ArgumentParser(prog="python -m megatrain.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="a training checkpoint (any layout) or an exported .pt")
    parser.add_argument("--data", required=True, help="directory of shards and manifest.json")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-bytes", type=int, default=None, help="score the first N bytes of the split")
    parser.add_argument("--strided", action="store_true", help="two passes offset by P/2 (Section 2.3.3)")
    parser.add_argument("--sliding", type=int, default=None, metavar="W", help="sliding windows, stride W bytes")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (per micro-batch in parallel)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pp", type=int, default=None, help="run the parallel model with this many pipeline stages")
    parser.add_argument("--tp", type=int, default=None, help="... and this tensor-parallel size")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes <= 0:
        parser.error(f"--max-bytes must be positive, got {args.max_bytes}")
    try:
        if args.pp or args.tp or discover_launcher() != "python":
            from megatrain.train.validation import evaluate_checkpoint

            result = evaluate_checkpoint(args.load, args.data, args.split, args.max_bytes, args.strided, args.sliding,
                                         args.pp or 1, args.tp or 1, args.batch_size)
            rank = dist.get_rank()
            leave_process_group()
            if rank != 0:
                return 0
        else:
            model = load_reference(args.load, args.device)
            data = read_split(args.data, args.split, args.max_bytes)
            cfg = model.config
            result = bits_per_byte(model, data, cfg.seq_len, cfg.patch_size, args.strided, args.sliding,
                                   args.batch_size, args.device)
    except (OSError, ValueError) as e:
        leave_process_group(wait_for_peers=False)
        parser.error(str(e))
    report = {"bpb": result["bpb"], "bytes": result["bytes"], "split": args.split, "strided": args.strided,
              "sliding": args.sliding}
    # one write: print's two (text, newline) could let a launcher's log line in between
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
