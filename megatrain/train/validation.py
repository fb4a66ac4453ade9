"""Bits per byte through the pipeline engine, on `megatrain.evaluate`'s scored windows.

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

import deepspeed
import numpy as np
import torch

from megatrain.checkpoint import read_client_state, resolve_tag
from megatrain.config import RunConfig, build
from megatrain.data import read_split
from megatrain.evaluate import UNSCORED, scored_windows, summary
from megatrain.parallel import MegabytePipeline, plan_layout

from .distributed import init_distributed
from .ds_config import deepspeed_config
from .resharding import load_weights

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


def evaluate_checkpoint(ckpt: str, data_dir: str, split: str, max_bytes: int | None, strided: bool,
                        sliding: int | None, pp: int, tp: int, micro_batch_size: int) -> dict:
    """Bits per byte of a checkpoint (of any layout) run as the pipeline-, tensor- and
    data-parallel model on this job's ranks (pp x tp x dp): for models one device cannot
    hold. Every rank returns the result."""
    tag = resolve_tag(ckpt)
    client = read_client_state(tag)
    cfg = evaluation_config(client["config"], pp, tp, micro_batch_size, f"{tag} (run config)")
    world = init_distributed(cfg.parallel.timeout_s)
    layout = plan_layout(cfg, world.size)
    model = MegabytePipeline(cfg.model, layout, cfg.train.seed, cfg.parallel.partition_method)
    config = {**deepspeed_config(cfg, layout), "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    load_weights(engine.module, tag, client)
    coord = layout.topology().get_coord(world.rank)
    data = read_split(data_dir, split, max_bytes, boundary=cfg.data.boundary.encode())
    plan = plan_evaluation(data, cfg.model.seq_len, cfg.model.patch_size, micro_batch_size, coord.data, layout.dp,
                           coord.pipe in (0, layout.pp - 1), strided, sliding)
    return pipeline_bits_per_byte(engine, plan)
