"""The cost model's activations (megatrain.parallel.cost) against what autograd really keeps."""

from __future__ import annotations

import pytest
import torch

from megatrain.config import load_config
from megatrain.model import Megabyte, bytes_loss
from megatrain.parallel import first_local_layer, pieces
from megatrain.parallel.masks import draw_whole_masks

from ..distributed import REPO

# tiny's layers at widths where a block's tensors dwarf its norms' statistics, 2,048 bytes
WIDE = ["model.global_dim=512", "model.local_dim=256", "model.global_heads=4", "model.local_heads=4",
        "model.seq_len=2048"]


def saved_bytes_by_layer(model: Megabyte, x: torch.Tensor) -> list[int]:
    """The bytes of the tensors autograd saves for backward in one forward pass, by the layer that
    saved them first (weights excluded: they are the optimizer's state)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer, saved = [0], {}
    for i, module in enumerate(model.layers):
        module.register_forward_pre_hook(lambda m, args, i=i: layer.__setitem__(0, i))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved.setdefault(storage.data_ptr(), (layer[0], storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bytes_loss(model(x), x)
    return [sum(n for at, n in saved.values() if at == i) for i in range(len(model.layers))]


def measured_and_estimated(*overrides: str, whole_masks: bool = False):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*WIDE, *overrides]).model
    torch.manual_seed(0)
    model = Megabyte(cfg).to(torch.bfloat16).train()
    if whole_masks:  # as the pipeline's layers draw them under parallel.layout_invariant_dropout
        for layer in model.layers:
            draw_whole_masks(layer)
    measured = saved_bytes_by_layer(model, torch.randint(0, 256, (1, cfg.seq_len)))
    by_layer = [sum(p.cost.activations for p in pieces(cfg, whole_masks) if p.layer == i) for i in range(len(measured))]
    return cfg, measured, [2 * values for values in by_layer]  # bf16: 2 bytes a value


def test_each_layer_keeps_what_the_cost_model_counts_in_bf16():
    """Every layer within 0.5%: a block's 16 x width per position, and the local model's
    attention weights over its 8 + 0 keys; the embedding its byte ids, the stage input its norm's
    input and output, the head its norm's, the fp32 logits and the targets."""
    _, measured, estimated = measured_and_estimated()
    assert measured == pytest.approx(estimated, rel=0.005)


def test_with_dropout_a_local_block_also_keeps_the_masks():
    """On a CPU dropout keeps its masks in the values' dtype, a value each, where CUDA's fused
    kernel (which the cost model counts) keeps a byte: the local blocks differ by exactly that.
    (The global blocks' SDPA has no fused dropout on a CPU, unlike CUDA's: not compared.)"""
    cfg, measured, estimated = measured_and_estimated("model.dropout=0.1")
    local = cfg.stages[-1]
    masks = 2 * local.dim + local.heads * cfg.patch_size  # the residual branches', attention's weights'
    cpu_extra = masks * cfg.seq_len * (2 - 1)  # bytes: a bf16 value against a byte, per mask value
    for i in range(first_local_layer(cfg) + 1, len(measured) - 1):  # between the stage input and the head
        assert measured[i] == pytest.approx(estimated[i] + cpu_extra, rel=0.005), i


def test_with_layout_invariant_dropout_attention_also_keeps_its_weights():
    """parallel.layout_invariant_dropout's masks are drawn in the values' dtype, and attention over
    many keys runs outside SDPA to apply them: the global blocks keep their weights [heads, K, K]
    too (on any device: the code is ours): within 1.5%, the causal mask of K x K bytes uncounted."""
    cfg, measured, estimated = measured_and_estimated("model.dropout=0.1", whole_masks=True)
    assert measured == pytest.approx(estimated, rel=0.015)
    weights = cfg.global_heads * cfg.num_patches**2 * (2 + 1 + 1) * 2  # fp32, the mask, the dropped; bf16 bytes
    assert weights > 0.3 * measured[1]  # a third of a global block here
