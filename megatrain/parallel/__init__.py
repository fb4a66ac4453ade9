"""3D parallelism for MEGABYTE on DeepSpeed: it wraps the model's layers, never forks them.

- `layout`: pp x tp x dp on the world, validated before any work;
- `tensor_parallel`: column/row-parallel linears for the global blocks;
- `patch_parallel`: the local model run on each tensor-parallel rank's share of the patches;
- `streams`: the random stream of each tensor-parallel rank (sharded attention, local model);
- `pipeline`: the PipelineModule that puts them together;
- `cost`: parameters, FLOPs and activations per layer (partitioning, MFU);
- `partition`: the pipeline's stages, the min-max cut of the model (at any layer or between a
  block's branches) by FLOPs or memory.
"""

from .cost import (LayerCost, Piece, layer_costs, model_flops_per_byte, pieces, recomputed_activations,
                   recomputed_blocks)
from .layout import Layout, LayoutError, layout_problems, plan_layout
from .patch_parallel import PatchParallelLoss, PatchShare, SplitPatches, patch_share, run_on_share
from .partition import PipelineCut, min_max_cut, pipeline_cut, stage_loads
from .pipeline import (MegabytePipeline, build_layer, byte_input_layer, first_local_layer, reference_model,
                       replicated_activations_only)
from .streams import rank_stream_state, run_in_rank_stream, seed_rank_stream, set_rank_stream_state
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, shard_block

__all__ = [
    "LayerCost", "Piece", "pieces", "PipelineCut", "pipeline_cut", "layer_costs", "model_flops_per_byte",
    "recomputed_activations", "recomputed_blocks",
    "Layout", "LayoutError", "layout_problems",
    "plan_layout", "PatchParallelLoss", "PatchShare", "SplitPatches", "patch_share",
    "run_on_share", "min_max_cut", "stage_loads", "MegabytePipeline", "byte_input_layer", "replicated_activations_only",
    "build_layer", "first_local_layer", "reference_model",
    "ColumnParallelLinear", "RowParallelLinear", "shard_block", "rank_stream_state", "run_in_rank_stream",
    "seed_rank_stream", "set_rank_stream_state",
]
