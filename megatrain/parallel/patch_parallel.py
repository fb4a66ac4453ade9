"""The local model, data-parallel over patches inside a tensor-parallel group.

The global model's output is replicated on every rank of a tensor-parallel group (its
row-parallel layers end in an all-reduce). The local model's weights are small, so
rather than splitting them each rank runs all of it on its own 1/tp share of the K
patches of every sequence, on whichever pipeline stages hold its layers:

- the split (`SplitPatches`) takes the share before the first local layer, wherever
  that sits; the rank carries its share through the following stages; its backward
  sums the global output's gradient over the group, since each rank's loss reached
  only its own patches;
- the loss (`PatchParallelLoss`) is this rank's cross-entropy sum over all the
  micro-batch's bytes, so that the shares add up to the mean over all bytes;
- the local parameters are replicated, so their gradients are summed over the group
  (`MegabytePipeline`, in one flat all-reduce a step) as well as averaged over data
  parallelism;
- dropout in the local model draws from the random stream of each rank's own
  (`streams.run_in_rank_stream`), so that the ranks' patches get independent masks
  while the global model's stream advances alike on every rank of the group; with
  `layout_invariant_dropout` each rank instead keeps its share's slice of the whole
  masks (`masks.draw_patch_slices`).

With cross-patch attention (r > 0) a patch depends on its predecessor at every
local layer, so each rank also recomputes a halo of preceding patches, as many as
there are local layers below the global model, and drops their outputs: the
outputs it keeps are then exactly those of the unsplit model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatrain.model import VOCAB_SIZE, MegabyteConfig

from .streams import run_in_rank_stream
from .tensor_parallel import copy_to_group

State = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PatchShare:
    """The patches of each sequence that one rank of a `size`-rank group computes."""

    num_patches: int  # K
    patch_size: int  # P
    rank: int
    size: int
    halo: int  # preceding patches recomputed for cross-patch attention

    @property
    def start(self) -> int:
        return self.rank * self.num_patches // self.size

    @property
    def stop(self) -> int:
        return (self.rank + 1) * self.num_patches // self.size

    @property
    def first(self) -> int:
        """The first patch computed: the share's start less the halo, within the sequence."""
        return max(0, self.start - self.halo)

    @property
    def halo_bytes(self) -> int:
        return (self.start - self.first) * self.patch_size


def patch_share(cfg: MegabyteConfig, rank: int, size: int) -> PatchShare:
    """The share of rank `rank` of `size`, with the halo that cross-patch attention needs."""
    halo = sum(stage.layers for stage in cfg.stages[1:]) if cfg.cross_patch and size > 1 else 0
    return PatchShare(cfg.num_patches, cfg.patch_size, rank, size, halo)


class SplitPatches:
    """A forward pre-hook for the first local layer: keep this rank's patches (and halo).

    The layer itself is unchanged; h [B, 1, K, D] and the bytes x [B, T] are cut to
    the patches first..stop of every sequence.
    """

    def __init__(self, share: PatchShare, group: dist.ProcessGroup) -> None:
        self.share = share
        self.group = group

    def __call__(self, module: nn.Module, args: tuple[State]) -> tuple[State]:
        (h, x), = args
        s, P = self.share, self.share.patch_size
        h = copy_to_group(h, self.group)
        # contiguous: a stage may start inside the local model and send these on (gloo sends no views)
        return ((h[:, :, s.first:s.stop].contiguous(), x[:, s.first * P:s.stop * P].contiguous()),)


class PatchParallelLoss:
    """Cross-entropy over this rank's bytes, divided by all the micro-batch's bytes.

    The returned value is the mean over all bytes (summed over the group), so that the
    engine reports the true loss, while its gradient is this rank's share alone. Targets
    of -100 (cross_entropy's ignore_index: bytes an evaluation does not score, and its
    padding) add nothing.
    """

    def __init__(self, share: PatchShare, group: dist.ProcessGroup) -> None:
        self.share = share
        self.group = group

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        s, P = self.share, self.share.patch_size
        logits = logits[:, s.halo_bytes:]
        mine = targets[:, s.start * P:s.stop * P]
        share = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), mine.reshape(-1),
                                reduction="sum") / targets.numel()
        if s.size == 1:
            return share
        total = share.detach().clone()
        dist.all_reduce(total, group=self.group)
        return share + (total - share.detach())


def run_on_share(local_layers: list[nn.Module], share: PatchShare, group: dist.ProcessGroup) -> None:
    """Make the local model (its layers, first to last) run on this rank's share of the
    patches, in the rank's random stream (`seed_rank_stream` seeds it); the layers
    themselves are unchanged."""
    local_layers[0].register_forward_pre_hook(SplitPatches(share, group))
    run_in_rank_stream(local_layers[0], local_layers[-1])
