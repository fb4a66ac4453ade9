"""MEGABYTE as a DeepSpeed PipelineModule over a pipe x data x model topology.

Pipeline layer i is layer i of the reference `Megabyte` (`layer_specs(cfg)`), built
from its own seed so that every layout starts from the same weights as
`reference_model(cfg, seed)`. Parallelism adapts the built layers without forking
their code:

- the global blocks are cut into pipeline stages; on each stage their linears are
  swapped for tensor-parallel shards (`shard_block`), their attention (this rank's
  heads) running in the rank's own random stream (`streams`);
- the local model (the first StageInput to the Head) is small and stays whole on the
  last stage, where every tensor-parallel rank runs it on its share of the patches
  (`patch_parallel`).
"""

from __future__ import annotations

import torch
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from deepspeed.runtime.utils import partition_balanced
from deepspeed.utils import logger
from torch import nn

from megatrain.model import Megabyte, MegabyteConfig, StageBlock, layer_specs, tie_local_embedding

from .cost import layer_costs
from .layout import Layout
from .patch_parallel import PatchParallelLoss, patch_share, run_on_share
from .streams import run_in_rank_stream, seed_rank_stream
from .tensor_parallel import shard_block


def first_local_layer(cfg: MegabyteConfig) -> int:
    """Index of the first layer below the global model (the global-to-local StageInput)."""
    return 1 + cfg.global_layers


def tensor_parallel_layers(cfg: MegabyteConfig) -> range:
    """The layers tensor parallelism shards: the global blocks (the rest is replicated)."""
    return range(1, first_local_layer(cfg))


def build_layer(cfg: MegabyteConfig, index: int, seed: int) -> nn.Module:
    """Layer `index` of the reference model, initialised on the CPU from a seed of its own.

    Only the CPU generator is seeded, and restored after: `torch.manual_seed` would also
    reseed every GPU's generator, which fork_rng(devices=[]) leaves unrestored."""
    cls, args = layer_specs(cfg)[index]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((seed * 1_000_003 + index) % 2**63)
        return cls(*args)


def reference_model(cfg: MegabyteConfig, seed: int) -> Megabyte:
    """The single-device model with the weights that every parallel layout starts from."""
    with torch.device("meta"):
        model = Megabyte(cfg)
    model.layers = nn.ModuleList(build_layer(cfg, i, seed) for i in range(len(model.layers)))
    if cfg.tie_local_embedding:
        tie_local_embedding(model.layers)
    return model


def pipeline_parts(cfg: MegabyteConfig, method: str, stages: int) -> list[int]:
    """Stage boundaries over the layers: stage s holds layers parts[s]..parts[s+1]-1.

    The embedding and the global blocks are balanced by `method` ("parameters",
    "flops" per byte, or "uniform" layer counts) with the whole local model counted
    as one item that the last stage always holds.
    """
    costs = layer_costs(cfg)
    weight = {"parameters": lambda c: c.params, "flops": lambda c: c.flops_per_byte,
              "uniform": lambda c: 1}[method]
    local = first_local_layer(cfg)
    items = [weight(c) for c in costs[:local]]
    items.append(1 if method == "uniform" else sum(weight(c) for c in costs[local:]))
    parts = partition_balanced(weights=items, num_parts=stages)
    return [int(p) for p in parts[:-1]] + [len(costs)]


class _SeededLayerSpec(LayerSpec):
    """A layer of the reference model built from its own seed, then adapted for parallelism."""

    def __init__(self, cfg: MegabyteConfig, index: int, seed: int, adapt) -> None:
        cls, args = layer_specs(cfg)[index]
        super().__init__(cls, *args)
        self.cfg, self.index, self.seed, self.adapt = cfg, index, seed, adapt

    def __repr__(self) -> str:
        return f"{self.typename.__name__}[{self.index}]"

    def build(self, log: bool = False) -> nn.Module:
        return self.adapt(self.index, build_layer(self.cfg, self.index, self.seed))


class MegabytePipeline(PipelineModule):
    """The pipeline-, tensor- and patch-parallel MEGABYTE for `DeepSpeed.initialize`."""

    def __init__(self, cfg: MegabyteConfig, layout: Layout, seed: int,
                 partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 compile_blocks: bool = False) -> None:
        self.config, self.compile_blocks = cfg, compile_blocks
        specs = [_SeededLayerSpec(cfg, i, seed, self._adapt) for i in range(len(layer_specs(cfg)))]
        super().__init__(specs, topology=layout.topology(), partition_method=partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         checkpointable_layers=["StageBlock"])
        self._local_params: list[nn.Parameter] = []
        if self.tp_size > 1:
            seed_rank_stream(seed, self.tp_rank)
        if self.stage_id == self.num_stages - 1:
            self._set_up_local_model()

    @property
    def tp_group(self):
        return self._grid.get_slice_parallel_group()

    @property
    def tp_rank(self) -> int:
        return self._grid.get_slice_parallel_rank()

    @property
    def tp_size(self) -> int:
        return self._grid.get_slice_parallel_world_size()

    def _adapt(self, index: int, layer: nn.Module) -> nn.Module:
        if index in tensor_parallel_layers(self.config) and self.tp_size > 1:
            run_in_rank_stream(layer.attn)  # its heads are this rank's: attention dropout of their own
            layer = shard_block(layer, self.tp_group)
        if self.compile_blocks and isinstance(layer, StageBlock):
            layer.compile()  # in place: the parameters keep their names
        return layer

    def _partition_layers(self, method: str = "parameters") -> None:
        # Called by PipelineModule.__init__: DeepSpeed's own methods cannot pin the local model.
        self.parts = pipeline_parts(self.config, method, self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
        if self.global_rank == 0:
            names = [repr(spec) for spec in self._layer_specs]
            for s in range(self.num_stages):
                logger.info(f"pipeline stage {s}: {', '.join(names[self.parts[s]:self.parts[s + 1]])}")

    def _set_up_local_model(self) -> None:
        layers = dict(zip(range(self._local_start, self._local_stop), self.forward_funcs))
        local = [layers[i] for i in range(first_local_layer(self.config), self._local_stop)]
        if self.config.tie_local_embedding:
            tie_local_embedding(local)
        share = patch_share(self.config, self.tp_rank, self.tp_size)
        self.loss_fn = PatchParallelLoss(share, self.tp_group)
        if self.tp_size > 1:
            run_on_share(local, share, self.tp_group)
            self._local_params = list(nn.ModuleList(local).parameters())

    def get_tied_weights_and_groups(self) -> list[tuple[nn.Parameter, object]]:
        """DeepSpeed all-reduces these gradients before the data-parallel reduction: here
        also the local model's, which each tensor-parallel rank computed on its patches."""
        return super().get_tied_weights_and_groups() + [(p, self.tp_group) for p in self._local_params]
