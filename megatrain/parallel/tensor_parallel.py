"""Megatron-style tensor parallelism on the topology's tensor ("model") axis.

A column-parallel linear holds a slice of the output features (for attention: a
slice of the heads), the row-parallel linear after it the matching slice of the
input features. The pair costs one all-reduce forward (after the row-parallel
matmul) and one backward (of the column-parallel one's input gradient, running while
that linear computes its weight gradient, as Megatron overlaps it). The model's layers
are not changed: `shard_block` swaps a dense block's four linears for this rank's shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatrain.model.layers import Block


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (the input was replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """Sums partial results over the group forward; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Mark x as replicated over `group` before rank-local work: backward sums its gradient."""
    return _CopyToGroup.apply(x, group)


def sum_over_group(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum each rank's partial x over `group`."""
    return _SumOverGroup.apply(x, group)


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int) -> None:
    """Tag a sharded parameter as Megatron does, so that DeepSpeed counts every shard
    in the gradient norm (replicated parameters count on tensor rank 0 only)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim


class _ShardedLinear(nn.Linear):
    """A bias-free linear holding this rank's shard of a dense weight."""

    partition_dim: int  # 0: a slice of the rows (output features), 1: of the columns (inputs)

    def __init__(self, weight: torch.Tensor, group: dist.ProcessGroup) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight)
        mark_tensor_parallel(self.weight, self.partition_dim)
        self.group = group


class _ColumnParallelLinear(torch.autograd.Function):
    """x W^T for a replicated x; backward sums x's gradient over the group while it computes
    W's (Megatron's overlap of the all-reduce with the weight-gradient matmul)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.group = group
        with torch.autocast(kind, enabled=False):
            return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = grad.matmul(weight)
        summed = dist.all_reduce(grad_x, group=ctx.group, async_op=True)
        grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        summed.wait()
        return grad_x, grad_weight, None


class ColumnParallelLinear(_ShardedLinear):
    """y_rank = x W_rank^T with W_rank this rank's rows of W; x is replicated over the group."""

    partition_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ColumnParallelLinear.apply(x, self.weight, self.group)


class RowParallelLinear(_ShardedLinear):
    """y = sum over ranks of x_rank W_rank^T, with W_rank this rank's columns of W."""

    partition_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_over_group(F.linear(x, self.weight), self.group)


# How a block's weights are split over tensor-parallel ranks: (dim, fused). Column-parallel
# weights by output features (dim 0), a fused [q | k | v] one block by block so that every
# rank holds the same heads of each; row-parallel ones by input features (dim 1). The
# block's other weights (its norms) are replicated.
BLOCK_SPLITS = {"attn.qkv.weight": (0, 3), "attn.proj.weight": (1, 1),
                "mlp.fc1.weight": (0, 1), "mlp.fc2.weight": (1, 1)}


def shard_weight(name: str, weight: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of a block's weight `name` (the whole weight if replicated)."""
    if name not in BLOCK_SPLITS or size == 1:
        return weight
    dim, fused = BLOCK_SPLITS[name]
    return torch.cat([block.chunk(size, dim)[rank] for block in weight.chunk(fused, dim)], dim).contiguous()


def merge_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The whole weight `name` from every rank's shard, in rank order: shard_weight's inverse."""
    if name not in BLOCK_SPLITS or len(shards) == 1:
        return shards[0]
    dim, fused = BLOCK_SPLITS[name]
    blocks = [shard.chunk(fused, dim) for shard in shards]  # per rank: its part of q, k and v
    return torch.cat([torch.cat([b[i] for b in blocks], dim) for i in range(fused)], dim)


def shard_block(block: Block, group: dist.ProcessGroup) -> Block:
    """Replace a dense block's attention and MLP linears by this rank's shards, in place.

    Attention keeps heads/size heads (it reads its head count off qkv's width); the
    MLP keeps hidden/size hidden units. Norms stay replicated.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    attn, mlp = block.attn, block.mlp
    for linear in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2):
        if linear.bias is not None:
            raise ValueError("tensor parallelism supports bias-free linears only")
    def sharded(name: str, parallel: type[_ShardedLinear]) -> _ShardedLinear:
        return parallel(shard_weight(f"{name}.weight", block.get_submodule(name).weight, rank, size), group)

    with torch.no_grad():
        attn.qkv, attn.proj = sharded("attn.qkv", ColumnParallelLinear), sharded("attn.proj", RowParallelLinear)
        mlp.fc1, mlp.fc2 = sharded("mlp.fc1", ColumnParallelLinear), sharded("mlp.fc2", RowParallelLinear)
    return block
