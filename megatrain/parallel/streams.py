"""The random stream of each tensor-parallel rank, beside the stream all ranks share.

Without tensor parallelism the shared stream is reseeded before every layer from the
micro-batch's ordinal and the layer (`LayerSeeds`), and again before a block's MLP
branch, so that a layer draws the same dropout masks on whichever pipeline stage it sits
(a block cut between its branches included) as on one rank. So it is under tensor
parallelism with `layout_invariant_dropout`, where the ranks draw whole masks and keep
their slices (`masks`) instead of the rank streams below.

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

from typing import Callable

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
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


# DeepSpeed keys each layer's forward by LAYER_KEY_STRIDE x the micro-batch's ordinal on
# its stage + a layer index: `PipelineModule(seed_layers=True)`.
LAYER_KEY_STRIDE = 1_000_003


def _seed_shared_stream(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().manual_seed(seed)  # the current device's generator: dropout draws there


class LayerSeeds:
    """The shared stream from (the run's seed, the micro-batch's ordinal, the layer, the
    branch) before each layer (`before_layer(index)`, a forward pre-hook) and before a
    block's MLP branch (`before_mlp_branch`, a pre-hook of the block's `norm2`).

    The ordinal comes from DeepSpeed's key (this is its `seed_fn`), which holds it as captured
    at the micro-batch's forward, so an activation-checkpointed recompute draws the
    forward's masks; every stage runs each micro-batch once, so ordinals agree over a
    pipeline, and a checkpoint saves them (the module's `micro_offset`). The key's layer
    index is not used: DeepSpeed counts it from each checkpointed run of layers' start.
    """

    def __init__(self, seed: int) -> None:
        self.seed, self.micro_batch, self.layer = seed, 0, 0

    def __call__(self, key: int) -> None:
        self.micro_batch = key // LAYER_KEY_STRIDE

    def _seed(self, branch: int) -> None:
        _seed_shared_stream((((self.seed * LAYER_KEY_STRIDE + self.micro_batch) * 4096 + self.layer) * 2 + branch)
                            % 2**63)

    def before_layer(self, index: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self.layer = index
            self._seed(0)
        return hook

    def before_mlp_branch(self, module: nn.Module, args: tuple) -> None:
        self._seed(1)
