"""Activation checkpointing of some blocks only (`train.checkpoint_blocks`): which blocks,
and that exactly those run their forward again in the backward pass, to the same gradients."""

from __future__ import annotations

from dataclasses import replace

import deepspeed
import pytest
import torch

from megatrain.config import load_config
from megatrain.model import StageBlock, bytes_loss, layer_specs
from megatrain.parallel import Layout, MegabytePipeline, first_local_layer, pipeline_cut, recomputed_blocks

from ..distributed import REPO, run_ranks
from .test_parallel_layers import SEED, SMALL

DROPPING = replace(SMALL, global_layers=2, local_layers=3, dropout=0.1)


def blocks(cfg, layers) -> list[int]:
    return [i for i in layers if layer_specs(cfg)[i][0] is StageBlock]


@pytest.mark.parametrize("name", ["megabyte-text-1b", "megabyte-1m"])
def test_the_local_model_recomputes_first(name):
    """Its blocks keep about twice the activations per FLOP of the global model's (a local
    block's width is half a global one's): they are recomputed before any global block."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml").model
    everything = range(len(layer_specs(cfg)))
    local = blocks(cfg, range(first_local_layer(cfg), len(layer_specs(cfg))))
    first_global = first_local_layer(cfg) - cfg.global_layers
    assert recomputed_blocks(cfg, everything, None) == blocks(cfg, everything)
    assert recomputed_blocks(cfg, everything, 0) == []
    assert recomputed_blocks(cfg, everything, 2) == local[:2]
    assert recomputed_blocks(cfg, everything, len(local) + 1) == [first_global, *local]
    assert recomputed_blocks(cfg, everything, 10_000) == blocks(cfg, everything)


def test_each_pipeline_stage_recomputes_its_own_blocks():
    """The count is per stage, as Megatron's --recompute-num-layers: a stage of global blocks
    recomputes as many as a stage of local ones; a block cut between its branches counts on
    both of its stages."""
    cfg = load_config(REPO / "configs" / "tiny.yaml").model
    cfg = replace(cfg, cross_patch=2)
    cut = pipeline_cut(cfg, "flops", 3)
    assert cut.parts == (0, 4, 5, 7) and cut.inside == (2,)  # global blocks 1, 2 | block 4, 5's attention | 5's MLP
    assert [recomputed_blocks(cfg, cut.layers(s), 1) for s in range(3)] == [[1], [4], [5]]
    assert [recomputed_blocks(cfg, cut.layers(s), None) for s in range(3)] == [[1, 2], [4, 5], [5]]


def forward_calls(rank: int, size: int) -> dict:
    """Forward calls of each layer over one forward and backward pass, and the gradients, for
    each number of recomputed blocks (dropout on: a recomputation must draw the same masks)."""
    deepspeed.init_distributed("gloo", verbose=False)
    x = torch.randint(0, 256, (2, DROPPING.seq_len))
    out = {}
    for name, interval, count in (("off", 0, None), ("all", 1, None), ("two", 1, 2), ("none", 1, 0)):
        pipeline = MegabytePipeline(DROPPING, Layout(pp=1, tp=1, dp=1), SEED, activation_checkpoint_interval=interval,
                                    checkpoint_blocks=count)
        calls = [0] * len(pipeline.forward_funcs)
        for i, layer in enumerate(pipeline.forward_funcs):
            layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        bytes_loss(pipeline(x), x).backward()
        out[name] = {"calls": calls, "grads": [p.grad for p in pipeline.parameters()]}
    return out


def test_only_the_chosen_blocks_run_their_forward_again():
    result, = run_ranks(forward_calls, 1)
    local = blocks(DROPPING, range(first_local_layer(DROPPING), len(layer_specs(DROPPING))))
    every = blocks(DROPPING, range(len(layer_specs(DROPPING))))
    for name, again in (("off", []), ("all", every), ("two", local[:2]), ("none", [])):
        expected = [2 if i in again else 1 for i in range(len(layer_specs(DROPPING)))]
        assert result[name]["calls"] == expected, name
        assert all(torch.equal(a, b) for a, b in zip(result["off"]["grads"], result[name]["grads"], strict=True)), name
