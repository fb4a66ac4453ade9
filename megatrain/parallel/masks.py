"""Dropout masks that do not depend on the layout (`parallel.layout_invariant_dropout`).

By default a tensor-parallel rank draws the masks of its own heads and patches from its
own stream (`streams`): fast, independent across ranks, but other masks than one rank
draws, so a tp run cannot be checked against a 1-rank run with dropout on. With this
option every rank draws, from the shared stream that `streams.LayerSeeds` reseeds per
layer and branch on every layout, the mask of the whole tensor as one rank would, and
keeps its slice: the sharded global attention's heads (axis 2 of the weights [B, n,
heads, m, keys]), the local model's share of the patches (axis 1 of its activations
[B, n, m, D] and of the weights). Replicated regions keep the whole mask. The price:
tp times the mask work in the sliced regions, and the weights of attention over many
keys computed outside SDPA, whose fused dropout draws masks of its own.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .patch_parallel import PatchShare


class SlicedDropout(nn.Module):
    """Dropout with the slice [first, first + count) of `total` units along `axis` of a mask
    drawn for the whole tensor; the input holds that slice (a unit may span several
    positions along the axis: the local model's inner stages hold several per patch).
    The defaults draw the mask of the input itself."""

    def __init__(self, p: float, axis: int = 0, first: int = 0, count: int = 1, total: int = 1) -> None:
        super().__init__()
        self.p, self.axis, self.first, self.count, self.total = p, axis, first, count, total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        per_unit = x.shape[self.axis] // self.count
        whole = list(x.shape)
        whole[self.axis] = self.total * per_unit
        keep = torch.empty(whole, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        return x * keep.narrow(self.axis, self.first * per_unit, x.shape[self.axis]).div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, axis={self.axis}, units {self.first}..{self.first + self.count} of {self.total}"


def _replace_dropouts(module: nn.Module, make: Callable[[float], nn.Module]) -> None:
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, name, make(child.p))


def draw_whole_masks(layer: nn.Module) -> None:
    """Every dropout of a replicated layer draws the mask of its input, from the shared stream."""
    _replace_dropouts(layer, SlicedDropout)


def draw_head_slices(block: nn.Module, tp_rank: int, tp_size: int, heads: int) -> None:
    """A tensor-parallel block's attention weights: this rank's heads' slice of the whole
    mask; its residual branches (replicated) the whole mask."""
    draw_whole_masks(block)
    share = heads // tp_size
    block.attn.drop = SlicedDropout(block.attn.drop.p, axis=2, first=tp_rank * share, count=share, total=heads)


def draw_patch_slices(layer: nn.Module, share: PatchShare) -> None:
    """A local layer run on this rank's share of the patches (halo included): that share's
    slice of every whole mask."""
    count = share.stop - share.first
    _replace_dropouts(layer, lambda p: SlicedDropout(p, axis=1, first=share.first, count=count,
                                                     total=share.num_patches))
