"""Layout checks, stage partitioning and the cost model (no processes)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from megatrain.config import load_config, stage_checkpoint_blocks
from megatrain.model import Head, StageInput, layer_specs
from megatrain.parallel import (LayoutError, first_local_layer, layer_costs, min_max_cut, model_flops_per_byte, pieces,
                                pipeline_cut, plan_layout, stage_loads)

from ..distributed import REPO


def config(name: str = "tiny", overrides: tuple[str, ...] = (), **parallel):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", list(overrides))
    return replace(cfg, parallel=replace(cfg.parallel, **parallel))


def test_data_parallel_is_what_is_left():
    layout = plan_layout(config(pp=2, tp=2), 8)
    assert (layout.pp, layout.tp, layout.dp, layout.world_size) == (2, 2, 2, 8)
    assert layout.topology().get_dim("model") == 2


@pytest.mark.parametrize("parallel, world, needle", [
    ({"pp": 3}, 4, "pp * tp = 3 * 1 = 3 does not divide the world size 4"),
    ({"tp": 4}, 4, "model.global_heads=2 is not divisible by tp=4"),
    ({"tp": 3}, 3, "the 32 patches of a sequence (seq_len / patch_size) cannot be shared evenly by tp=3"),
    ({"pp": 12}, 12, "pp=12 stages need at least 12 places to start, the model has 11"),
    ({"pp": 0}, 4, "pp and tp must be positive"),
    ({"partition_method": "type:StageBlock"}, 1, "parallel.partition_method='type:StageBlock' is not one of"),
])
def test_bad_layouts_are_named(parallel, world, needle):
    with pytest.raises(LayoutError) as err:
        plan_layout(config(**parallel), world)
    assert needle in str(err.value)


def test_a_list_of_checkpoint_blocks_gives_one_count_per_pipeline_stage():
    counts = ["train.activation_checkpointing=true", "train.checkpoint_blocks=[1, 0]"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*counts, "parallel.pp=2"])
    assert plan_layout(cfg, 2).pp == 2
    assert [stage_checkpoint_blocks(cfg.train.checkpoint_blocks, s) for s in range(2)] == [1, 0]
    problem = "lists 2 counts, one per pipeline stage, but the pipeline has 3 (parallel.pp / --pp)"
    with pytest.raises(LayoutError, match=re.escape(f"train.checkpoint_blocks {problem}")):
        plan_layout(load_config(REPO / "configs" / "tiny.yaml", [*counts, "parallel.pp=3"]), 3)


def test_global_batch_must_split_into_whole_micro_batches_per_rank():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.global_batch_size=24"])  # micro-batches of 4
    assert plan_layout(cfg, 6).dp == 6
    with pytest.raises(LayoutError, match=r"train.global_batch_size=24 is not a multiple of "
                                          r"train.micro_batch_size x dp = 4 x 4"):
        plan_layout(cfg, 4)


def best_bottleneck(weights: list[float], stages: int) -> float:
    """The least largest-stage cost of any contiguous cut into `stages` non-empty parts, by
    binary search on the bottleneck (greedy packing decides each guess): independent of the DP."""
    def fits(limit: float) -> bool:
        parts, load = 1, 0.0
        for w in weights:
            if w > limit:
                return False
            if load + w > limit:
                parts, load = parts + 1, 0.0
            load += w
        return parts <= stages
    lo, hi = max(weights), sum(weights)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@pytest.mark.parametrize("method", ["flops", "memory", "parameters", "uniform"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 7, 11])
def test_every_stage_holds_a_contiguous_part_of_the_model(method, stages):
    cfg = config().model
    cut = pipeline_cut(cfg, method, stages)
    assert cut.parts[0] == 0 and cut.parts[-1] == len(layer_specs(cfg)) and len(cut.parts) == stages + 1
    held = cut.stage_pieces(cfg)
    assert all(held), "every stage holds a piece"
    assert [p for stage in held for p in stage] == pieces(cfg), "each piece once, in order"


def test_a_stage_may_start_between_a_blocks_branches():
    """At the issue's text-1b proportions (global 512 x 4, local 256 x 5) no cut at whole
    layers balances pp=2 better than 43.75% / 56.25%; the cut inside local block 7 gives
    48.4% / 51.6%: stage 0 ends with its attention branch, stage 1 starts at its MLP."""
    cfg = config(overrides=["model.global_dim=512", "model.global_layers=4", "model.global_heads=8",
                            "model.local_dim=256", "model.local_layers=5", "model.local_heads=4",
                            "model.seq_len=2048"]).model
    cut = pipeline_cut(cfg, "flops", 2)
    assert (cut.parts, cut.inside) == ((0, 7, 12), (1,))
    assert list(cut.layers(0)) == [*range(8)] and list(cut.layers(1)) == [*range(7, 12)]
    assert (cut.branch(0, 7), cut.branch(1, 7), cut.branch(0, 6), cut.branch(1, 8)) == ("attention", "mlp", None, None)
    loads = stage_loads(cfg, cut)
    assert max(loads) / sum(loads) == pytest.approx(0.516, abs=1e-3)
    whole = [c.flops_per_byte for c in layer_costs(cfg)]
    assert best_bottleneck(whole, 2) / sum(whole) == pytest.approx(0.5625, abs=1e-3)


@pytest.mark.parametrize("name", ["megabyte-text-1b", "megabyte-1m", "megabyte-audio", "megabyte-imagenet64"])
@pytest.mark.parametrize("stages", [2, 4, 8])
def test_flops_partition_balances_compute(name, stages):
    """max / mean stage FLOPs <= 1.15, or the best any contiguous cut of the layers allows
    (within 2%); the DP is exact over the places a stage may start."""
    cfg = config(name).model
    cut = pipeline_cut(cfg, "flops", stages)
    loads = stage_loads(cfg, cut)
    weights = [c.flops_per_byte for c in layer_costs(cfg)]
    assert sum(loads) == pytest.approx(sum(weights)) and len(loads) == stages
    best_of_layers = best_bottleneck(weights, stages)
    assert max(loads) <= 1.15 * sum(loads) / stages or max(loads) <= 1.02 * best_of_layers, (cut, loads)
    assert max(loads) <= best_bottleneck([p.cost.flops_per_byte for p in pieces(cfg)], stages) * (1 + 1e-9)
    if stages >= 4:
        assert cut.parts[-2] > first_local_layer(cfg), "the local model is cut too"


def test_min_max_cut_is_exact_on_small_lists():
    import itertools
    weights = [5, 1, 1, 1, 9, 2, 2, 7, 3]
    for stages in range(1, len(weights) + 1):
        parts = min_max_cut(weights, stages)
        best = min(max(sum(weights[a:b]) for a, b in zip(c, c[1:]))
                   for cuts in itertools.combinations(range(1, len(weights)), stages - 1)
                   for c in [[0, *cuts, len(weights)]])
        assert max(sum(weights[a:b]) for a, b in zip(parts, parts[1:])) == best
    with pytest.raises(ValueError, match="cannot cut 9 layers into 10 non-empty stages"):
        min_max_cut(weights, 10)


def test_memory_partition_weighs_local_activations():
    """Local activations are T x D_L per sequence, global ones K x P*D_G: at 1m (P = 128) the
    local blocks hold most of the memory too, so memory also cuts the local model."""
    cfg = config("megabyte-1m").model
    costs = layer_costs(cfg)
    g, l = costs[1], costs[first_local_layer(cfg) + 1]
    # 16 x width per position, and with dropout half a value a mask value in each residual branch
    assert g.activations == 17 * cfg.global_dim * cfg.num_patches and l.activations == 17 * cfg.local_dim * cfg.seq_len
    assert pipeline_cut(cfg, "memory", 2).parts[1] > first_local_layer(cfg)


def test_cost_model_matches_the_paper_count():
    cfg = config("megabyte-text-1b").model
    costs = layer_costs(cfg)
    specs = layer_specs(cfg)
    assert costs[0].flops_per_byte == 0  # embedding lookups
    g, l = cfg.global_dim, cfg.local_dim
    assert costs[1].flops_per_byte == (6 * 12 * g * g + 12 * g * cfg.num_patches) / cfg.patch_size
    local_block = costs[first_local_layer(cfg) + 1]
    assert local_block.flops_per_byte == 6 * 12 * l * l + 12 * l * cfg.patch_size
    assert specs[-1][0] is Head and costs[-1].flops_per_byte == 6 * 256 * l
    assert specs[first_local_layer(cfg)][0] is StageInput
    total_params = sum(c.params for c in costs) - costs[-1].params  # the head is tied
    assert 0.9e9 < total_params < 0.95e9
    assert model_flops_per_byte(cfg) == sum(c.flops_per_byte for c in costs)
