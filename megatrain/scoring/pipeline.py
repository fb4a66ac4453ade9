"""Bits per byte through the pipeline engine, on `megatrain.scoring`'s windows.

Training's validation and `python -m megatrain.evaluate` under a launcher both run it.
The last stage's loss (`PatchParallelLoss`) is the nats of the scored targets over all
the micro-batch's bytes, and the engine averages it over micro-batches and data-parallel
ranks, so the nats scored are loss x micro-batches x bytes per micro-batch. Every
data-parallel rank runs as many micro-batches; windows that score nothing fill the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatrain.config import RunConfig, build
from megatrain.scoring import UNSCORED, scored_windows, summary

Batch = tuple[torch.Tensor, torch.Tensor]  # (bytes for the first stage, targets for the last)


@dataclass(frozen=True)
class EvalPlan:
    batches: list[Batch | None]  # this rank's micro-batches; None where its stage reads no data
    micro_batches: int  # over all data-parallel ranks
    bytes_per_micro_batch: int
    scored_bytes: int


def plan_evaluation(data: np.ndarray, seq_len: int, patch_size: int, micro_batch_size: int, dp_rank: int,
                    dp_size: int, reads_data: bool, strided: bool = False, sliding: int | None = None) -> EvalPlan:
    """This data-parallel rank's share of the micro-batches that score every byte of `data`."""
    windows = list(scored_windows(data, seq_len, patch_size, strided, sliding))
    if not windows:
        raise ValueError("no bytes to evaluate")
    scored = sum(int((targets != UNSCORED).sum()) for _, targets in windows)
    per_rank = math.ceil(len(windows) / (micro_batch_size * dp_size))
    blank = (torch.zeros(seq_len, dtype=torch.int64), torch.full((seq_len,), UNSCORED, dtype=torch.int64))
    windows += [blank] * (per_rank * micro_batch_size * dp_size - len(windows))
    mine = windows[dp_rank * per_rank * micro_batch_size:(dp_rank + 1) * per_rank * micro_batch_size]
    batches: list[Batch | None] = [None] * per_rank
    if reads_data:
        batches = [tuple(torch.stack(t) for t in zip(*mine[i * micro_batch_size:(i + 1) * micro_batch_size]))
                   for i in range(per_rank)]
    return EvalPlan(batches, per_rank * dp_size, micro_batch_size * seq_len, scored)


def pipeline_bits_per_byte(engine: Any, plan: EvalPlan) -> dict:
    """{"bpb", "bytes", "nats"} of the plan's bytes under the engine's model (every rank)."""
    batches = iter(plan.batches) if plan.batches[0] is not None else None
    loss = engine.eval_batch(batches, num_micro_batches=len(plan.batches)).item()
    return summary(loss * plan.micro_batches * plan.bytes_per_micro_batch, plan.scored_bytes)


def evaluation_config(raw: dict, pp: int, tp: int, micro_batch_size: int, source: str) -> RunConfig:
    """A checkpoint's run config (`raw`) set to evaluate at pp x tp in micro-batches of
    micro_batch_size windows, one per step: its training batch settings do not apply."""
    train = {**raw["train"], "micro_batch_size": micro_batch_size, "grad_accum_steps": 1, "global_batch_size": 0}
    return build(RunConfig, {**raw, "train": train, "parallel": {**raw["parallel"], "pp": pp, "tp": tp}}, source)
