"""Layout checks, stage partitioning and the cost model (no processes)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatrain.config import load_config
from megatrain.model import Head, StageInput, layer_specs
from megatrain.parallel import LayoutError, first_local_layer, layer_costs, model_flops_per_byte, pipeline_parts, plan_layout

from ..distributed import REPO


def config(name: str = "tiny", **parallel):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    return replace(cfg, parallel=replace(cfg.parallel, **parallel))


def test_data_parallel_is_what_is_left():
    layout = plan_layout(config(pp=2, tp=2), 8)
    assert (layout.pp, layout.tp, layout.dp, layout.world_size) == (2, 2, 2, 8)
    assert layout.topology().get_dim("model") == 2


@pytest.mark.parametrize("parallel, world, needle", [
    ({"pp": 3}, 4, "pp * tp = 3 * 1 = 3 does not divide the world size 4"),
    ({"tp": 4}, 4, "model.global_heads=2 is not divisible by tp=4"),
    ({"tp": 3}, 3, "the 32 patches of a sequence (seq_len / patch_size) cannot be shared evenly by tp=3"),
    ({"pp": 5}, 5, "pp=5 stages need at least 3 global layers"),
    ({"pp": 0}, 4, "pp and tp must be positive"),
    ({"partition_method": "type:StageBlock"}, 1, "parallel.partition_method='type:StageBlock' is not one of"),
])
def test_bad_layouts_are_named(parallel, world, needle):
    with pytest.raises(LayoutError) as err:
        plan_layout(config(**parallel), world)
    assert needle in str(err.value)


def test_global_batch_must_split_into_whole_micro_batches_per_rank():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.global_batch_size=24"])  # micro-batches of 4
    assert plan_layout(cfg, 6).dp == 6
    with pytest.raises(LayoutError, match=r"train.global_batch_size=24 is not a multiple of "
                                          r"train.micro_batch_size x dp = 4 x 4"):
        plan_layout(cfg, 4)


@pytest.mark.parametrize("method", ["parameters", "flops", "uniform"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_local_model_stays_whole_on_the_last_stage(method, stages):
    cfg = config().model
    parts = pipeline_parts(cfg, method, stages)
    assert parts[0] == 0 and parts[-1] == len(layer_specs(cfg)) and len(parts) == stages + 1
    assert all(a < b for a, b in zip(parts, parts[1:])), "every stage holds a layer"
    assert parts[-2] <= first_local_layer(cfg)


def test_flops_partition_balances_compute():
    cfg = config("megabyte-text-1b").model
    # the local model costs more per byte than the 14 global blocks: alone on its stage
    assert pipeline_parts(cfg, "flops", 2) == [0, first_local_layer(cfg), len(layer_specs(cfg))]
    assert pipeline_parts(cfg, "uniform", 2)[1] == 8


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
