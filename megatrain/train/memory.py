"""What a training run holds on each rank of a pipeline stage, estimated from the cost model,
and the fewest blocks a stage must recompute (train.checkpoint_blocks) to fit a device.

A stage's memory is its optimizer state (weights, gradients, Adam moments under DeepSpeed's
ZeRO-1, measured: tests/train/test_memory.py) and its activations: those each layer keeps
for backward (`megatrain.parallel.cost`; a recomputed block keeps its input, and its own
activations come back while its backward runs, one block at a time) times the micro-batches
the 1F1B schedule holds in flight on that stage.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from megatrain.config import ConfigError, RunConfig, stage_checkpoint_blocks
from megatrain.parallel import Layout, first_local_layer, pipeline_cut, recomputed_activations, recomputed_blocks
from megatrain.parallel.pipeline import tensor_parallel_layers

from .distributed import local_ranks
from .ds_config import deepspeed_config

BYTES_PER_ACTIVATION = {"bf16": 2, "fp32": 4}  # by train.precision
AUTO_SHARE = 0.9  # of the device's memory, for train.checkpoint_blocks: auto (the allocator, CUDA, NCCL take the rest)


def state_mib(run: RunConfig, layout: Layout, params: float) -> float:
    """The weights, gradients and Adam state of `params` parameters on one rank at their peak, with
    DeepSpeed's optimizers under ZeRO-1: the fp32 master weight and two moments (12 bytes a
    parameter) split over the dp ranks. bf16: the bf16 weight and gradient and the fp32
    accumulated gradient whole on every rank (8 bytes). fp32: the weight and its gradient whole
    (8), the reduced gradient's share (4 / dp) beside them, and one reduction bucket of
    `reduce_bucket_size` fp32 values (DeepSpeed's default: 1.9 GiB)."""
    if run.train.precision == "bf16":
        return params * (8 + 12 / layout.dp) / 2**20
    zero = DeepSpeedZeroConfig(**deepspeed_config(run, layout)["zero_optimization"])
    bucket = zero.reduce_bucket_size * 4 if zero.contiguous_gradients else 0
    return (params * (8 + 16 / layout.dp) + bucket) / 2**20


class StageMemory:
    """One pipeline stage's memory on one of its ranks: the global blocks' parameters split over
    tp, the local model's activations too (each tp rank runs it on its share of the patches); the
    global blocks' activations counted whole (an upper bound at tp > 1: their norms' inputs are
    replicated, the rest is split)."""

    def __init__(self, run: RunConfig, layout: Layout, stage: int) -> None:
        cfg, train = run.model, run.train
        cut = pipeline_cut(cfg, run.parallel.partition_method, layout.pp)
        self.config, self.stage, self.layers = cfg, stage, cut.layers(stage)
        self.pieces = cut.stage_pieces(cfg, run.parallel.layout_invariant_dropout)[stage]
        sharded, local = set(tensor_parallel_layers(cfg)), first_local_layer(cfg)
        self.params = sum(p.cost.params / (layout.tp if p.layer in sharded else 1) for p in self.pieces)
        self.state_mib = state_mib(run, layout, self.params)
        self._share = {i: 1 / layout.tp if i >= local else 1 for i in self.layers}
        self._full = {i: sum(p.cost.activations for p in self.pieces if p.layer == i) * self._share[i]
                      for i in self.layers}
        # 1F1B: this stage runs the forward of up to pp - stage micro-batches before their backward
        self.in_flight = min(layout.pp - stage, train.accumulation_steps(layout.dp))
        self._mib_per_element = train.micro_batch_size * BYTES_PER_ACTIVATION[train.precision] / 2**20

    def recomputed(self, count: int | None) -> list[int]:
        """The blocks recomputed when the stage recomputes `count` (None: all)."""
        return recomputed_blocks(self.config, self.layers, count)

    def _kept_and_again(self, recomputed: Sequence[int]) -> tuple[float, float]:
        kept = sum(recomputed_activations(self.config, i) * self._share[i] if i in recomputed else self._full[i]
                   for i in self.layers)
        return kept, max((self._full[i] for i in recomputed), default=0)

    def activation_mib(self, recomputed: Sequence[int]) -> float:
        """The activations of one micro-batch at their peak (in its backward)."""
        kept, again = self._kept_and_again(recomputed)
        return (kept + again) * self._mib_per_element

    def activation_peak_mib(self, recomputed: Sequence[int]) -> float:
        """Those of the micro-batches in flight at once."""
        kept, again = self._kept_and_again(recomputed)
        return (kept * self.in_flight + again) * self._mib_per_element

    def memory_mib(self, recomputed: Sequence[int]) -> float:
        return self.state_mib + self.activation_peak_mib(recomputed)

    def fewest_recomputed(self, memory_mib: float) -> int | None:
        """The fewest blocks this stage must recompute to fit in `memory_mib`; None if all are not enough."""
        blocks = len(self.recomputed(None))
        return next((n for n in range(blocks + 1) if self.memory_mib(self.recomputed(n)) <= memory_mib), None)


def stage_memories(run: RunConfig, layout: Layout) -> list[StageMemory]:
    return [StageMemory(run, layout, s) for s in range(layout.pp)]


def device_memory_gib(device: torch.device) -> float:
    """What one rank may hold: the GPU's memory, or on a CPU the machine's shared by its local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / local_ranks() / 2**30


def auto_budget_gib(run: RunConfig, memory_gib: float | None) -> float:
    """What a rank may hold under train.checkpoint_blocks: auto: train.checkpoint_memory_gib, or
    else AUTO_SHARE of `memory_gib`, its device's memory."""
    budget = run.train.checkpoint_memory_gib or (memory_gib or 0) * AUTO_SHARE
    if not budget:
        raise ConfigError("train.checkpoint_blocks: auto needs the device's memory: set train.checkpoint_memory_gib "
                          "(or the bench's --memory-gib)")
    return budget


def checkpoint_counts(run: RunConfig, layout: Layout, memory_gib: float | None) -> tuple[int | None, ...]:
    """How many blocks each pipeline stage recomputes under train.activation_checkpointing (None:
    all); auto: each stage's fewest that fit in `auto_budget_gib` by the estimate (every block
    where none fits)."""
    counts = run.train.checkpoint_blocks
    problem = run.train.checkpoint_blocks_problem(layout.pp)
    if problem:
        raise ConfigError(f"train.checkpoint_blocks: {problem}")
    if counts != "auto":
        return tuple(stage_checkpoint_blocks(counts, s) for s in range(layout.pp))
    budget_mib = auto_budget_gib(run, memory_gib) * 1024
    return tuple(stage.fewest_recomputed(budget_mib) for stage in stage_memories(run, layout))


def describe_auto(run: RunConfig, layout: Layout, counts: tuple[int | None, ...], budget_gib: float) -> list[str]:
    """What train.checkpoint_blocks: auto chose, stage by stage, for the run's log."""
    stages = stage_memories(run, layout)
    chosen = [len(stage.recomputed(count)) for stage, count in zip(stages, counts)]
    lines = [f"train.checkpoint_blocks auto: {chosen} for {budget_gib:.4g} GiB a rank"]
    for stage, count in zip(stages, counts):
        estimate = stage.memory_mib(stage.recomputed(count)) / 1024
        if estimate > budget_gib:
            lines.append(f"warning: pipeline stage {stage.stage} needs {estimate:.4g} GiB by the estimate even "
                         "recomputing every block (more pipeline stages, or a smaller micro-batch?)")
        else:
            lines.append(f"  stage {stage.stage}: {len(stage.recomputed(count))} of {len(stage.recomputed(None))} "
                         f"blocks recomputed, {estimate:.4g} GiB by the estimate")
    return lines
