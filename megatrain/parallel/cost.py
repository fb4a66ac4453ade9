"""What each layer of `layer_specs(cfg)` costs, and each piece a pipeline stage may start
at (a whole layer, or one of a block's two residual branches): parameters and model FLOPs
per byte.

Model FLOPs per byte for training (forward + backward) follow the paper's count,
6 * (N_global / P + N_local), layer by layer: a layer whose positions stand for p
bytes does 6 * (its matmul parameters) / p, plus attention 12 * width * context / p
(the PaLM convention: causal masking not discounted). Embedding lookups are free.

Activations are the values a layer keeps for backward per sequence, in the run's precision
(16 x width per position for a block: norms, q/k/v, attention output, the MLP's 4x hidden
twice; attention's scores are not kept, scaled_dot_product_attention recomputes them). A block
whose activations are recomputed keeps its input alone (1 x width per position). Counted
against what autograd saves in bf16 (tests/parallel/test_cost.py): within 2% for a block.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

import torch
from torch import nn

from megatrain.model import VOCAB_SIZE, GlobalEmbedding, MegabyteConfig, StageBlock, StageInput, layer_specs
from megatrain.model.layers import SMALL_ATTENTION_MAX


@dataclass(frozen=True)
class LayerCost:
    params: int
    flops_per_byte: float
    activations: int  # elements kept for backward per sequence

    def __add__(self, other: "LayerCost") -> "LayerCost":
        return LayerCost(self.params + other.params, self.flops_per_byte + other.flops_per_byte,
                         self.activations + other.activations)


@dataclass(frozen=True)
class Piece:
    """What a pipeline stage may start at: layer `layer` whole (branch None), or one of a
    block's residual branches (`StageBlock.BRANCHES`)."""

    layer: int
    branch: str | None
    cost: LayerCost


BYTE_ID_VALUES = 4  # an int64 byte id, in bf16 values (the embeddings keep the ids alone)
# A block's 16 x width per position: the attention branch keeps its input, the norm, q, k, v and
# attention's output; the MLP branch its input, the norm and the 4x hidden twice.
BRANCH_ACTIVATIONS_PER_WIDTH = {"attention": 6, "mlp": 10}


def _activations(cfg: MegabyteConfig, cls: type, args: tuple) -> int:
    if cls is StageInput:  # the stage above's output, normed, then projected: its norm's input and output
        above = cfg.stages[args[1] - 1]
        return 2 * above.dim * (cfg.seq_len // above.patch_size)
    if cls is GlobalEmbedding:
        return BYTE_ID_VALUES * cfg.seq_len
    # the head: its norm's input and output, the loss's fp32 logits (two values each) and targets
    return cfg.seq_len * (2 * cfg.local_dim + 2 * VOCAB_SIZE + BYTE_ID_VALUES)


def _bytes_per_position(cfg: MegabyteConfig, cls: type, args: tuple) -> int:
    if cls in (StageBlock, StageInput):
        return cfg.stages[args[1]].patch_size
    return 1  # the byte embedding (and its convolutions) and the head work byte by byte


def _attention_context(cfg: MegabyteConfig, stage: int) -> int:
    if stage == 0:
        return cfg.num_patches
    units = cfg.stages[stage - 1].patch_size // cfg.stages[stage].patch_size
    return units + cfg.cross_patch


def _params_and_matmul_flops(modules: list[nn.Module]) -> tuple[int, float]:
    params = sum(p.numel() for m in modules for p in m.parameters())
    matmul = sum(sub.weight.numel() for m in modules for sub in m.modules() if isinstance(sub, (nn.Linear, nn.Conv1d)))
    return params, 6.0 * matmul


def _branch_costs(cfg: MegabyteConfig, block: StageBlock, stage: int,
                  whole_masks: bool) -> list[tuple[str, LayerCost]]:
    s = cfg.stages[stage]
    positions = cfg.seq_len // s.patch_size
    costs = []
    for branch, names in StageBlock.BRANCHES.items():
        params, flops = _params_and_matmul_flops([getattr(block, name) for name in names])
        if branch == "attention":
            flops += 12.0 * s.dim * _attention_context(cfg, stage)
        costs.append((branch, LayerCost(params, flops / s.patch_size,
                                        int(_branch_activations(cfg, stage, branch, whole_masks) * positions))))
    return costs


def _branch_activations(cfg: MegabyteConfig, stage: int, branch: str, whole_masks: bool) -> float:
    """The values a block's branch keeps per position. Dropout keeps its mask: a byte a value
    (half a bf16 value) from CUDA's fused kernel, a value each on a CPU and from the masks that
    parallel.layout_invariant_dropout draws itself (`whole_masks`). Attention computed outside
    SDPA, over few keys or with those masks, also keeps its fp32 weights (two values each) and
    their cast, with dropout their mask and the dropped weights instead."""
    s = cfg.stages[stage]
    mask = (1.0 if whole_masks else 0.5) if cfg.dropout else 0.0
    values = (BRANCH_ACTIVATIONS_PER_WIDTH[branch] + mask) * s.dim
    keys = _attention_context(cfg, stage)
    if branch == "attention" and (keys <= SMALL_ATTENTION_MAX or (whole_masks and cfg.dropout)):
        values += s.heads * keys * (3 + mask)
    return values


def pieces(cfg: MegabyteConfig, whole_masks: bool = False) -> list[Piece]:
    """Every place a pipeline stage may start, in `layer_specs` order, with what it costs
    (`whole_masks`: its activations under parallel.layout_invariant_dropout)."""
    found = []
    for index, (cls, args) in enumerate(layer_specs(cfg)):
        with torch.device("meta"):
            layer = cls(*args)
        if cls is StageBlock:
            found += [Piece(index, branch, cost) for branch, cost in _branch_costs(cfg, layer, args[1], whole_masks)]
        else:
            params, flops = _params_and_matmul_flops([layer])
            cost = LayerCost(params, flops / _bytes_per_position(cfg, cls, args), _activations(cfg, cls, args))
            found.append(Piece(index, None, cost))
    return found


def layer_costs(cfg: MegabyteConfig) -> list[LayerCost]:
    """The cost of every layer of the model, in `layer_specs` order."""
    costs: list[LayerCost] = []
    for layer, group in groupby(pieces(cfg), key=lambda p: p.layer):
        costs.append(sum((p.cost for p in group), LayerCost(0, 0.0, 0)))
    return costs


def model_flops_per_byte(cfg: MegabyteConfig) -> float:
    """Training FLOPs (forward + backward) of the whole model per byte of input."""
    return sum(c.flops_per_byte for c in layer_costs(cfg))


def recomputed_blocks(cfg: MegabyteConfig, layers: Iterable[int], count: int | None) -> list[int]:
    """Which transformer blocks among `layers` (a pipeline stage's) recompute their activations
    in the backward pass, in forward order: `count` of them (every one when None), those that
    keep the most activations per FLOP of recomputation first (the narrower local model's
    before the global model's: each keeps about 16 x width per position for 24 x width^2
    FLOPs), the first in forward order among equals."""
    specs = layer_specs(cfg)
    blocks = [i for i in layers if specs[i][0] is StageBlock]
    if count is None or count == 0 or count >= len(blocks):
        return blocks[:count]  # all or none: no order to find (and no layers to build for their costs)
    costs = layer_costs(cfg)
    by_saving = sorted(blocks, key=lambda i: -costs[i].activations / costs[i].flops_per_byte)
    return sorted(by_saving[:count])


def recomputed_activations(cfg: MegabyteConfig, layer: int) -> int:
    """What block `layer` keeps for backward per sequence when it is recomputed: its input."""
    s = cfg.stages[layer_specs(cfg)[layer][1][1]]
    return s.dim * (cfg.seq_len // s.patch_size)
