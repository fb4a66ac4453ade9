"""MEGABYTE as a DeepSpeed PipelineModule over a pipe x data x model topology.

Pipeline layer i is layer i of the reference `Megabyte` (`layer_specs(cfg)`), built
from its own seed so that every layout starts from the same weights as
`reference_model(cfg, seed)`. Parallelism adapts the built layers without forking
their code:

- every layer may start a pipeline stage, and so may a block's MLP branch
  (`partition.pipeline_cut` balances the FLOPs): the local model runs once per byte, so at
  MEGABYTE's proportions it is most of the work and is cut into stages too; a block cut
  between its branches is a `BlockBranch` on each of the two stages;
- on every stage the global blocks' linears are swapped for tensor-parallel shards
  (`shard_block`), their attention (this rank's heads) running in the rank's own random
  stream (`streams`), or keeping its heads' slice of the whole masks (`masks`);
- the local model (the first StageInput to the Head) is replicated over the tensor-parallel
  group: each rank takes its share of the patches at the first local layer
  (`patch_parallel`) and carries that share through the following stages, so the
  activations a stage sends inside the local model differ over the group (DeepSpeed's
  `pipe_partitioned` send, which assumes them replicated, is turned off:
  `replicated_activations_only`). Its gradients are summed over the group in one flat
  all-reduce a step;
- without tensor parallelism each layer's dropout draws from a seed of the micro-batch and
  the layer (`streams.LayerSeeds`), so that any cut draws the masks of one rank; with it
  too where `layout_invariant_dropout` has every rank draw whole masks and keep its slice
  (`masks`), so that any layout does;
- the tied local embedding (the byte-level StageInput's, also the Head's output matrix)
  is two copies with summed gradients when those layers sit on different stages.
"""

from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from deepspeed.utils import logger
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatrain.config import stage_checkpoint_blocks
from megatrain.model import Megabyte, MegabyteConfig, StageBlock, layer_specs, residual_branch, tie_local_embedding

from .layout import Layout
from .cost import recomputed_blocks
from .masks import draw_head_slices, draw_patch_slices, draw_whole_masks
from .partition import PipelineCut, pipeline_cut
from .patch_parallel import PatchParallelLoss, SplitPatches, patch_share
from .streams import LAYER_KEY_STRIDE, LayerSeeds, run_in_rank_stream, seed_rank_stream
from .tensor_parallel import shard_block


def first_local_layer(cfg: MegabyteConfig) -> int:
    """Index of the first layer below the global model (the global-to-local StageInput)."""
    return 1 + cfg.global_layers


def byte_input_layer(cfg: MegabyteConfig) -> int:
    """Index of the byte-level StageInput, whose byte embedding the Head's output may share."""
    return len(layer_specs(cfg)) - cfg.local_layers - 2


def replicated_activations_only(cfg: MegabyteConfig, cut: PipelineCut) -> bool:
    """Whether every activation sent between stages is replicated over the tensor-parallel
    group: no stage starts below the first local layer, where the patches are split."""
    return all(start <= first_local_layer(cfg) for start in cut.parts[1:-1])


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


class BlockBranch(nn.Module):
    """One residual branch of a StageBlock whose block a stage boundary cuts: the branch's
    modules under the block's own names, so that its parameters keep the reference model's
    (`{layer}.attn.qkv.weight`); the other branch is on the next or the previous stage."""

    def __init__(self, block: StageBlock, branch: str) -> None:
        super().__init__()
        self.branch = branch
        for name in StageBlock.BRANCHES[branch]:
            self.add_module(name, getattr(block, name))
        self.drop = block.drop

    def forward(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, x = state
        norm, f = (getattr(self, name) for name in StageBlock.BRANCHES[self.branch])
        return residual_branch(h, norm, f, self.drop), x


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
                 partition_method: str = "flops", activation_checkpoint_interval: int = 0,
                 compile_blocks: bool = False, layout_invariant_dropout: bool = False,
                 checkpoint_blocks: int | tuple[int, ...] | None = None) -> None:
        """activation_checkpoint_interval 1 recomputes the activations of `checkpoint_blocks` of
        each stage's blocks in the backward pass (all when None, a count per stage when a tuple;
        `recomputed_blocks` picks them)."""
        self.config, self.compile_blocks = cfg, compile_blocks
        self.checkpoint_blocks = checkpoint_blocks if activation_checkpoint_interval else 0
        # Under tensor parallelism the sharded regions draw from each rank's own stream,
        # unless every rank draws whole masks and keeps its slice (`masks`).
        self.whole_masks = layout_invariant_dropout
        self.rank_streams = layout.tp > 1 and not layout_invariant_dropout
        self.layer_seeds = None if self.rank_streams else LayerSeeds(seed)
        specs = [_SeededLayerSpec(cfg, i, seed, self._adapt) for i in range(len(layer_specs(cfg)))]
        super().__init__(specs, topology=layout.topology(), partition_method=partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         seed_layers=self.layer_seeds is not None, seed_fn=self.layer_seeds,
                         base_seed=LAYER_KEY_STRIDE)
        self._local_params: list[nn.Parameter] = []
        self._tied_copy: list[tuple[nn.Parameter, object]] = []  # the local embedding and its stages' group
        if self.rank_streams:
            seed_rank_stream(seed, self.tp_rank)
        self._set_up_local_model(seed)
        self._recomputed = {self.forward_funcs[i - self._local_start] for i in self.recomputed(self.stage_id)}
        if activation_checkpoint_interval:
            self._precompute_checkpointable_values()  # as the engine does: the module runs alone too

    @property
    def tp_group(self):
        return self._grid.get_slice_parallel_group()

    @property
    def tp_rank(self) -> int:
        return self._grid.get_slice_parallel_rank()

    @property
    def tp_size(self) -> int:
        return self._grid.get_slice_parallel_world_size()

    def stage_of(self, layer: int) -> int:
        return next(s for s in range(self.num_stages) if layer < self.parts[s + 1])

    def _adapt(self, index: int, layer: nn.Module) -> nn.Module:
        tensor_parallel = index in tensor_parallel_layers(self.config) and self.tp_size > 1
        if self.whole_masks:
            self._draw_masks_as_one_rank(index, layer)
        elif tensor_parallel:
            run_in_rank_stream(layer.attn)  # its heads are this rank's: attention dropout of their own
        if tensor_parallel:
            layer = shard_block(layer, self.tp_group)
        if self.layer_seeds is not None and isinstance(layer, StageBlock):
            layer.norm2.register_forward_pre_hook(self.layer_seeds.before_mlp_branch)
        branch = self.cut.branch(self.stage_id, index)
        if branch is not None:
            layer = BlockBranch(layer, branch)
        if self.layer_seeds is not None:
            layer.register_forward_pre_hook(self.layer_seeds.before_layer(index))
        if self.compile_blocks and isinstance(layer, (StageBlock, BlockBranch)):
            layer.compile()  # in place: the parameters keep their names
        return layer

    def recomputed(self, stage: int) -> list[int]:
        """The layers of `stage` whose activations are recomputed in the backward pass."""
        count = stage_checkpoint_blocks(self.checkpoint_blocks, stage)
        return recomputed_blocks(self.config, self.cut.layers(stage), count)

    def _is_checkpointable(self, funcs: list[nn.Module]) -> bool:
        # DeepSpeed's own choice (by class name) would take every block of the stage.
        return all(f in self._recomputed for f in funcs)

    def _draw_masks_as_one_rank(self, index: int, layer: nn.Module) -> None:
        cfg = self.config
        if self.tp_size > 1 and index in tensor_parallel_layers(cfg):
            draw_head_slices(layer, self.tp_rank, self.tp_size, cfg.global_heads)
        elif self.tp_size > 1 and index >= first_local_layer(cfg):
            draw_patch_slices(layer, patch_share(cfg, self.tp_rank, self.tp_size))
        else:
            draw_whole_masks(layer)

    def _partition_layers(self, method: str = "flops") -> None:
        # Called by PipelineModule.__init__: DeepSpeed's own methods do not know the layers' FLOPs.
        self.cut = pipeline_cut(self.config, method, self.num_stages)
        self.parts = list(self.cut.parts)
        layers = self.cut.layers(self.stage_id)
        self._set_bounds(start=layers.start, stop=layers.stop)
        if self.global_rank == 0:
            for s in range(self.num_stages):
                recomputed = self.recomputed(s)
                names = [repr(self._layer_specs[i]) + (f".{b}" if (b := self.cut.branch(s, i)) else "")
                         + (" (recomputed)" if i in recomputed else "") for i in self.cut.layers(s)]
                logger.info(f"pipeline stage {s}: {', '.join(names)}")

    # A branch's files are named apart from the other branch's, which the other stage saves.
    def _branch_name(self, local_layer_idx: int) -> str | None:
        layer = self.forward_funcs[local_layer_idx]
        return layer.branch if isinstance(layer, BlockBranch) else None

    def ckpt_layer_path(self, ckpt_dir: str, local_layer_idx: int) -> str:
        path, branch = super().ckpt_layer_path(ckpt_dir, local_layer_idx), self._branch_name(local_layer_idx)
        if branch is None:
            return path
        name = f"layer_{local_layer_idx + self._local_start:02d}"
        return os.path.join(ckpt_dir, os.path.basename(path).replace(f"{name}-", f"{name}.{branch}-", 1))

    def ckpt_layer_path_list(self, ckpt_dir: str, local_layer_idx: int) -> list[str]:
        branch = self._branch_name(local_layer_idx)
        if branch is None:
            return super().ckpt_layer_path_list(ckpt_dir, local_layer_idx)
        name = f"layer_{local_layer_idx + self._local_start:02d}.{branch}"
        return sorted(glob.glob(os.path.join(ckpt_dir, f"{name}-*model_states.pt")))  # one per tp rank

    def _set_up_local_model(self, seed: int) -> None:
        cfg, first = self.config, first_local_layer(self.config)
        layers = dict(zip(range(self._local_start, self._local_stop), self.forward_funcs))
        local = [layers[i] for i in range(max(first, self._local_start), self._local_stop)]
        share = patch_share(cfg, self.tp_rank, self.tp_size)
        if cfg.tie_local_embedding:
            self._tie_local_embedding(layers, seed)
        if local and self.tp_size > 1:
            if first in layers:
                layers[first].register_forward_pre_hook(SplitPatches(share, self.tp_group))
            if self.rank_streams:
                run_in_rank_stream(local[0], local[-1])
            self._local_params = list(nn.ModuleList(local).parameters())
        if self.stage_id == self.num_stages - 1:
            self.loss_fn = PatchParallelLoss(share, self.tp_group)

    def _tie_local_embedding(self, layers: dict[int, nn.Module], seed: int) -> None:
        """Tie the Head's output matrix to the byte embedding, or, where the two layers sit on
        different stages, start it as a copy whose gradient the two stages sum (counted once
        in the gradient norm, on the embedding's stage)."""
        cfg, embedding, head = self.config, byte_input_layer(self.config), len(layer_specs(self.config)) - 1
        stages = sorted({self.stage_of(embedding), self.stage_of(head)})
        if len(stages) == 1:
            if embedding in layers:
                tie_local_embedding(layers.values())
            return
        coord = self._topo.get_coord(self.global_rank)
        for data in range(self._topo.get_dim("data")):  # every rank makes every group, in one order
            for model in range(self._topo.get_dim("model")):
                ranks = [self._topo.get_rank(pipe=s, data=data, model=model) for s in stages]
                group = dist.new_group(ranks)
                if (data, model) == (coord.data, coord.model) and self.global_rank in ranks:
                    weight = layers[embedding].byte_embed.weight if embedding in layers else layers[head].out.weight
                    self._tied_copy = [(weight, group)]
        if head in layers:
            with torch.no_grad():
                layers[head].out.weight.copy_(build_layer(cfg, embedding, seed).byte_embed.weight)
            layers[head].out.weight.ds_pipe_replicated = True  # counted once in the gradient norm
            layers[head].out.weight.embedding_copy = True  # no weight decay, as the embedding

    def get_tied_weights_and_groups(self) -> list[tuple[nn.Parameter, object]]:
        """The engine's one call a step before its data-parallel reduction, which all-reduces
        the weights returned (the local embedding's copies over their two stages). First the
        local model's gradients, which each tensor-parallel rank computed on its own patches,
        are summed over the group here in one flat all-reduce (not one per parameter)."""
        grads = [g for g in map(_gradient, self._local_params) if g is not None]
        if grads:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.tp_group)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)
        return super().get_tied_weights_and_groups() + self._tied_copy


def _gradient(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer steps with: the fp32 one under DeepSpeed's bf16 optimizer."""
    hp = getattr(param, "_hp_grad", None)
    return hp if hp is not None else param.grad
