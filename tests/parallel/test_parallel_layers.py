"""Tensor-parallel blocks and the patch-parallel local model against their dense selves (2 ranks)."""

from __future__ import annotations

import copy
from dataclasses import replace

import deepspeed
import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatrain.model import (MegabyteConfig, StageConfig, StageInput, bytes_loss, layer_specs,
                             tie_local_embedding)
from megatrain.parallel import (ColumnParallelLinear, Layout, MegabytePipeline, PatchParallelLoss, RowParallelLinear, SplitPatches,
                                build_layer, first_local_layer, patch_share, rank_stream_state, run_in_rank_stream,
                                run_on_share, seed_rank_stream, shard_block)
from megatrain.parallel.tensor_parallel import BLOCK_SPLITS, merge_shards, shard_weight

from ..distributed import run_ranks

SMALL = MegabyteConfig(seq_len=32, patch_size=4, global_dim=32, global_layers=1, global_heads=4,
                       local_dim=16, local_layers=2, local_heads=2, dropout=0.0, init_std=0.1)
LOCAL_VARIANTS = {
    "plain": SMALL,
    "cross_patch": replace(SMALL, cross_patch=2),
    "mid_stage_cross_patch": replace(SMALL, seq_len=64, patch_size=8, global_dim=64, cross_patch=2,
                                     mid_stages=(StageConfig(patch_size=2, dim=32, layers=1, heads=2),)),
}
SEED = 7


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def tensor_parallel_block(rank: int, size: int, dtype: torch.dtype = torch.float64,
                          autocast: bool = False) -> dict[str, float]:
    """Largest gaps between a sharded global block and the dense one: output, input and weight grads
    (and whether every gradient has its tensor's dtype)."""
    group = dist.group.WORLD
    dense = build_layer(SMALL, 1, SEED).to(dtype)
    sharded = shard_block(build_layer(SMALL, 1, SEED).to(dtype), group)
    torch.manual_seed(0)  # the same input and output weights on every rank
    h = torch.randn(2, 1, SMALL.num_patches, SMALL.global_dim, dtype=dtype)
    x = torch.zeros(2, SMALL.seq_len, dtype=torch.long)
    probe = torch.randn(2, 1, SMALL.num_patches, SMALL.global_dim, dtype=dtype)
    grads, outs = [], []
    for block in (dense, sharded):
        h_in = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = block((h_in, x))
        (out.to(dtype) * probe).sum().backward()
        grads.append(h_in.grad)
        outs.append(out.to(dtype))
    gaps = {"output": max_diff(*outs), "input_grad": max_diff(*grads)}
    for name, p in sharded.named_parameters():
        g = dict(dense.named_parameters())[name].grad
        if getattr(p, "tensor_model_parallel", False):
            g = shard_weight(name, g, rank, size)
        gaps[f"grad {name}"] = max_diff(p.grad, g)
    gaps["grads_in_own_dtype"] = float(all(p.grad.dtype == p.dtype for p in sharded.parameters())
                                       and grads[1].dtype == dtype)
    kinds = {type(m) for m in sharded.modules()}
    gaps["heads_per_rank"] = sharded.attn.qkv.out_features // (3 * sharded.attn.head_dim)
    gaps["sharded_types"] = float({ColumnParallelLinear, RowParallelLinear} <= kinds)
    return gaps


def local_layers(cfg: MegabyteConfig) -> nn.ModuleList:
    layers = nn.ModuleList(build_layer(cfg, i, SEED).double()
                           for i in range(first_local_layer(cfg), len(layer_specs(cfg))))
    tie_local_embedding(layers)
    return layers


def run_local(layers: nn.ModuleList, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    state = (h, x)
    for layer in layers[:-1]:
        state = layer(state)
    return layers[-1](state)


def patch_parallel_local_model(rank: int, size: int, name: str) -> dict[str, float]:
    """Gaps between the patch-split local model (summed over ranks) and the unsplit one."""
    cfg, group = LOCAL_VARIANTS[name], dist.group.WORLD
    torch.manual_seed(0)
    h = torch.randn(2, 1, cfg.num_patches, cfg.global_dim, dtype=torch.float64)
    x = torch.randint(0, 256, (2, cfg.seq_len))
    whole = local_layers(cfg)
    h_whole = h.clone().requires_grad_()
    loss_whole = bytes_loss(run_local(whole, h_whole, x), x)
    loss_whole.backward()

    split = copy.deepcopy(whole)
    share = patch_share(cfg, rank, size)
    split[0].register_forward_pre_hook(SplitPatches(share, group))
    seen = []
    split[0].register_forward_hook(lambda m, args, out: seen.append(args[0][0].shape[2]))
    h_split = h.clone().requires_grad_()
    split.zero_grad()
    loss = PatchParallelLoss(share, group)(run_local(split, h_split, x), x)
    loss.backward()
    gaps = {"loss": abs(loss.item() - loss_whole.item()), "global_output_grad": max_diff(h_split.grad, h_whole.grad),
            "patches_run": seen[0], "halo": share.start - share.first}
    for (n, p), q in zip(split.named_parameters(), whole.parameters()):
        dist.all_reduce(p.grad, group=group)
        gaps[f"grad {n}"] = max_diff(p.grad, q.grad)
    assert isinstance(split[0], StageInput)
    return gaps


def random_streams(rank: int, size: int) -> dict[str, bool]:
    """With dropout and a halo on one rank only, does the outer (global model's) random stream
    stay identical over the group, with and without the rank's own stream for the local model?"""
    cfg, group = replace(LOCAL_VARIANTS["cross_patch"], dropout=0.5), dist.group.WORLD
    torch.manual_seed(0)
    h = torch.randn(2, 1, cfg.num_patches, cfg.global_dim, dtype=torch.float64)
    x = torch.randint(0, 256, (2, cfg.seq_len))
    out = {}
    for own_stream in (False, True):
        layers, share = local_layers(cfg).train(), patch_share(cfg, rank, size)
        if own_stream:
            seed_rank_stream(SEED, rank)
            run_on_share(layers, share, group)
        else:
            layers[0].register_forward_pre_hook(SplitPatches(share, group))
        torch.manual_seed(1)
        run_local(layers, h, x)
        states = [None] * size
        dist.all_gather_object(states, torch.get_rng_state())
        out[f"outer stream in sync, own stream {own_stream}"] = all(torch.equal(s, states[0]) for s in states)
        if own_stream:
            dist.all_gather_object(states, rank_stream_state())
            out["local streams differ"] = not torch.equal(*(s["model-parallel-rng"] for s in states))
    return out


def attention_dropout_masks(rank: int, size: int) -> dict[str, bool]:
    """A sharded block whose heads are all alike (the same q, k and v), with attention dropout:
    head j of each rank then gives the same output exactly when its dropout mask is the same."""
    cfg = replace(SMALL, dropout=0.5)
    block = build_layer(cfg, 1, SEED)
    with torch.no_grad():
        qkv = block.attn.qkv.weight.view(3, cfg.global_heads, -1, cfg.global_dim)
        qkv.copy_(qkv[:, :1].expand_as(qkv))
    torch.manual_seed(0)
    h = torch.randn(2, 1, cfg.num_patches, cfg.global_dim)
    x = torch.zeros(2, cfg.seq_len, dtype=torch.long)
    out = {}
    for how in ("shared stream", "own stream", "pipeline"):
        if how == "pipeline":  # as MegabytePipeline shards it: with the rank's stream
            deepspeed.init_distributed("gloo", verbose=False)
            pipeline = MegabytePipeline(cfg, Layout(pp=1, tp=size, dp=1), SEED)
            sharded = pipeline.forward_funcs[1].train()
            with torch.no_grad():
                sharded.attn.qkv.weight.copy_(shard_weight("attn.qkv.weight", block.attn.qkv.weight, rank, size))
        else:
            sharded = shard_block(copy.deepcopy(block), dist.group.WORLD).train()
        if how == "own stream":
            seed_rank_stream(SEED, rank)
            run_in_rank_stream(sharded.attn)
        heads = []
        sharded.attn.proj.register_forward_pre_hook(lambda m, args: heads.append(args[0]))
        torch.manual_seed(1)
        sharded((h, x))
        gathered, states = [None] * size, [None] * size
        dist.all_gather_object(gathered, heads[0])
        dist.all_gather_object(states, torch.get_rng_state())
        out[f"heads' masks differ over ranks, {how}"] = not torch.equal(*gathered)
        out[f"outer stream in sync, {how}"] = torch.equal(*states)
    return out


def all_checks(rank: int, size: int) -> dict:
    return {"tp": tensor_parallel_block(rank, size),
            "tp_bf16": tensor_parallel_block(rank, size, torch.bfloat16),
            "tp_autocast": tensor_parallel_block(rank, size, torch.float32, autocast=True),
            "rng": random_streams(rank, size),
            "attention_rng": attention_dropout_masks(rank, size),
            "local": {name: patch_parallel_local_model(rank, size, name) for name in LOCAL_VARIANTS}}


@pytest.fixture(scope="module")
def per_rank():
    return run_ranks(all_checks, 2)  # one launch for every check in this module


@pytest.mark.parametrize("kind, tolerance", [("tp", 1e-12), ("tp_bf16", 0.05), ("tp_autocast", 0.05)])
def test_tensor_parallel_block_equals_dense(per_rank, kind, tolerance):
    """In float64 to rounding; in bf16 weights, and in fp32 ones under bf16 autocast, within
    bf16's rounding of the partial sums (each gradient in its tensor's dtype)."""
    for rank, gaps in enumerate(r[kind] for r in per_rank):
        assert gaps.pop("sharded_types") == 1.0
        assert gaps.pop("heads_per_rank") == SMALL.global_heads // 2
        assert gaps.pop("grads_in_own_dtype") == 1.0
        assert any(k.startswith("grad attn.qkv") for k in gaps)
        for what, gap in gaps.items():
            assert gap < tolerance, f"rank {rank}: {what} differs by {gap}"


def test_local_dropout_keeps_the_global_random_stream_in_sync(per_rank):
    for checks in (r["rng"] for r in per_rank):
        assert checks == {"outer stream in sync, own stream False": False,  # the halo drew more
                          "outer stream in sync, own stream True": True, "local streams differ": True}


def test_sharded_attention_dropout_draws_masks_of_each_ranks_own(per_rank):
    for checks in (r["attention_rng"] for r in per_rank):
        assert checks == {"heads' masks differ over ranks, shared stream": False,  # head j alike everywhere
                          "outer stream in sync, shared stream": True,
                          "heads' masks differ over ranks, own stream": True, "outer stream in sync, own stream": True,
                          "heads' masks differ over ranks, pipeline": True, "outer stream in sync, pipeline": True}


@pytest.mark.parametrize("name", list(LOCAL_VARIANTS))
def test_local_model_runs_on_its_share_of_patches(per_rank, name):
    cfg = LOCAL_VARIANTS[name]
    K = cfg.num_patches
    for rank, gaps in enumerate(r["local"][name] for r in per_rank):
        halo = gaps.pop("halo")
        assert halo == (0 if rank == 0 or not cfg.cross_patch else sum(s.layers for s in cfg.stages[1:]))
        assert gaps.pop("patches_run") == K // 2 + halo
        for what, gap in gaps.items():  # float64; the batched matmul's blocking follows the patch count
            assert gap < 1e-9, f"{name}, rank {rank}: {what} differs by {gap}"


@pytest.mark.parametrize("size", [1, 2, 4])
def test_shards_merge_back_and_keep_whole_heads(size):
    block = build_layer(SMALL, 1, SEED)
    for name in BLOCK_SPLITS:
        weight = block.get_parameter(name).detach()
        shards = [shard_weight(name, weight, rank, size) for rank in range(size)]
        assert torch.equal(merge_shards(name, shards), weight), name
    qkv = block.attn.qkv.weight.detach()
    q, k, v = qkv.chunk(3)
    head_rows = SMALL.global_dim // size
    for rank in range(size):  # rank r holds the same heads of q, k and v
        rows = slice(rank * head_rows, (rank + 1) * head_rows)
        assert torch.equal(shard_weight("attn.qkv.weight", qkv, rank, size), torch.cat([q[rows], k[rows], v[rows]]))


def compiled_blocks(rank: int, size: int) -> dict[str, object]:
    """Which layers of train.compile's pipeline are compiled, and its parameters' names."""
    deepspeed.init_distributed("gloo", verbose=False)
    pipeline = MegabytePipeline(SMALL, Layout(pp=1, tp=1, dp=1), SEED, compile_blocks=True)
    return {"compiled": [f._compiled_call_impl is not None for f in pipeline.forward_funcs],
            "names": list(pipeline.state_dict())}


def test_train_compile_compiles_each_block_in_place():
    """Only the transformer blocks; in place, so a checkpoint's names stay as they were
    (torch.compile(module) would prefix them with _orig_mod)."""
    result, = run_ranks(compiled_blocks, 1)
    g, l = SMALL.global_layers, SMALL.local_layers
    assert result["compiled"] == [False] + [True] * g + [False] + [True] * l + [False]
    assert "1.attn.qkv.weight" in result["names"] and not any("_orig_mod" in n for n in result["names"])
