"""The random stream of each tensor-parallel rank, beside the stream all ranks share.

Where the ranks of a tensor-parallel group hold the same activations (the embeddings,
the residual stream and norms of the global blocks) dropout must draw the same masks on
every rank, so it draws from the shared default stream. Where each rank holds its own
(the sharded attention's heads, the local model's share of the patches) it must draw
masks of its own, or head j of every rank gets the same one: such regions run in the
rank's stream (`run_in_rank_stream`), Megatron's model-parallel stream. That stream is
DeepSpeed's RNG tracker (`get_cuda_rng_tracker`), which activation checkpointing saves
before a checkpointed forward and restores for its recomputation, so that the
recomputed masks are the forward's; a checkpoint saves its state (`rank_stream_state`).
"""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

STREAM = "model-parallel-rng"  # the tracker's default name: DeepSpeed's `fork()` enters it


def seed_rank_stream(seed: int, tp_rank: int) -> None:
    """(Re)start this process's rank stream from the run's seed and the tensor-parallel rank."""
    tracker = deepspeed.checkpointing.get_cuda_rng_tracker()
    tracker.reset()  # one model per process owns the tracker (a test builds many)
    tracker.add(STREAM, seed * 1_000_003 + 500_009 + tp_rank)  # apart from the layers' init seeds


def rank_stream_state() -> dict[str, torch.Tensor]:
    """The rank stream's state ({} when there is none: tp = 1), for a checkpoint."""
    return deepspeed.checkpointing.get_cuda_rng_tracker().get_states()


def set_rank_stream_state(state: dict[str, torch.Tensor]) -> None:
    deepspeed.checkpointing.get_cuda_rng_tracker().set_states(dict(state))


class _RankStream:
    """Hooks that swap the rank stream in before `first`'s forward and out after `last`'s."""

    def __init__(self) -> None:
        self.forks: list = []

    def enter(self, module: nn.Module, args: tuple) -> None:
        fork = deepspeed.checkpointing.get_cuda_rng_tracker().fork(STREAM)
        fork.__enter__()
        self.forks.append(fork)

    def leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self.forks.pop().__exit__(None, None, None)


def run_in_rank_stream(first: nn.Module, last: nn.Module | None = None) -> None:
    """Run `first` (through `last`, for a chain of layers) in the rank's own random stream;
    the modules themselves are unchanged."""
    stream = _RankStream()
    first.register_forward_pre_hook(stream.enter)
    (last or first).register_forward_hook(stream.leave)
