"""3D parallelism for MEGABYTE on DeepSpeed: it wraps the model's layers, never forks them.

- `layout`: pp x tp x dp on the world, validated before any work;
- `tensor_parallel`: column/row-parallel linears for the global blocks;
- `patch_parallel`: the local model run on each tensor-parallel rank's share of the patches;
- `pipeline`: the PipelineModule that puts them together;
- `cost`: parameters and FLOPs per layer (partitioning, MFU).
"""

from .cost import LayerCost, layer_costs, model_flops_per_byte
from .layout import Layout, LayoutError, layout_problems, plan_layout
from .patch_parallel import (LocalRandomStream, PatchParallelLoss, PatchShare, SplitPatches, patch_share,
                             run_on_share)
from .pipeline import MegabytePipeline, build_layer, first_local_layer, pipeline_parts, reference_model
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, shard_block

__all__ = [
    "LayerCost", "layer_costs", "model_flops_per_byte", "Layout", "LayoutError", "layout_problems",
    "plan_layout", "LocalRandomStream", "PatchParallelLoss", "PatchShare", "SplitPatches", "patch_share",
    "run_on_share", "MegabytePipeline", "build_layer", "first_local_layer", "pipeline_parts", "reference_model",
    "ColumnParallelLinear", "RowParallelLinear", "shard_block",
]
