"""What each layer of `layer_specs(cfg)` costs: parameters and model FLOPs per byte.

Model FLOPs per byte for training (forward + backward) follow the paper's count,
6 * (N_global / P + N_local), layer by layer: a layer whose positions stand for p
bytes does 6 * (its matmul parameters) / p, plus attention 12 * width * context / p
(the PaLM convention: causal masking not discounted). Embedding lookups are free.

Activations are the elements a layer keeps for backward per sequence (about 16 x width
per position for a block: norms, q/k/v, attention output, the MLP's 4x hidden twice;
attention's scores are not kept, scaled_dot_product_attention recomputes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatrain.model import VOCAB_SIZE, GlobalEmbedding, MegabyteConfig, StageBlock, StageInput, layer_specs


@dataclass(frozen=True)
class LayerCost:
    params: int
    flops_per_byte: float
    activations: int  # elements kept for backward per sequence


ACTIVATIONS_PER_WIDTH = {GlobalEmbedding: 2, StageBlock: 16, StageInput: 3}


def _activations(cfg: MegabyteConfig, cls: type, args: tuple) -> int:
    if cls in (StageBlock, StageInput):
        s = cfg.stages[args[1]]
        return ACTIVATIONS_PER_WIDTH[cls] * s.dim * (cfg.seq_len // s.patch_size)
    if cls is GlobalEmbedding:
        return ACTIVATIONS_PER_WIDTH[cls] * cfg.seq_len * cfg.global_embed_dim
    return cfg.seq_len * (cfg.local_dim + 2 * VOCAB_SIZE)  # the head: its input, logits, softmax


def _bytes_per_position(cfg: MegabyteConfig, cls: type, args: tuple) -> int:
    if cls in (StageBlock, StageInput):
        return cfg.stages[args[1]].patch_size
    return 1  # the byte embedding (and its convolutions) and the head work byte by byte


def _attention_context(cfg: MegabyteConfig, stage: int) -> int:
    if stage == 0:
        return cfg.num_patches
    units = cfg.stages[stage - 1].patch_size // cfg.stages[stage].patch_size
    return units + cfg.cross_patch


def layer_costs(cfg: MegabyteConfig) -> list[LayerCost]:
    """The cost of every layer of the model, in `layer_specs` order."""
    costs = []
    for cls, args in layer_specs(cfg):
        with torch.device("meta"):
            layer = cls(*args)
        matmul_params = sum(m.weight.numel() for m in layer.modules()
                            if isinstance(m, (nn.Linear, nn.Conv1d)))
        flops = 6.0 * matmul_params
        if cls is StageBlock:
            flops += 12.0 * cfg.stages[args[1]].dim * _attention_context(cfg, args[1])
        params = sum(p.numel() for p in layer.parameters())
        costs.append(LayerCost(params, flops / _bytes_per_position(cfg, cls, args), _activations(cfg, cls, args)))
    return costs


def model_flops_per_byte(cfg: MegabyteConfig) -> float:
    """Training FLOPs (forward + backward) of the whole model per byte of input."""
    return sum(c.flops_per_byte for c in layer_costs(cfg))
