"""Layout-invariant dropout (megatrain.parallel.masks): a rank's slice of a whole mask is the
mask one rank draws for those heads or patches, in the local model's activations and
attention weights, and through an attention over more keys than `small_attention` takes."""

import pytest
import torch
from torch import nn

from megatrain.model import layers
from megatrain.model.layers import Attention
from megatrain.parallel.masks import SlicedDropout, draw_head_slices, draw_patch_slices, draw_whole_masks
from megatrain.parallel.patch_parallel import PatchShare


def dropped(drop: nn.Module, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    return drop(x)


def test_by_default_it_is_torch_dropout():
    x = torch.randn(4, 6, 8, 16)
    assert torch.equal(dropped(SlicedDropout(0.3), x), dropped(nn.Dropout(0.3), x))
    assert torch.equal(SlicedDropout(0.3).eval()(x), x)


@pytest.mark.parametrize("per_patch", [1, 3])  # the local model's inner stages hold several units per patch
@pytest.mark.parametrize("halo", [0, 2])
def test_a_share_of_the_patches_gets_its_slice_of_the_whole_mask(per_patch, halo):
    K, p = 8, 0.25
    x = torch.randn(3, K * per_patch, 5, 4)
    whole = dropped(SlicedDropout(p), x)
    for rank in range(4):
        share = PatchShare(K, patch_size=5, rank=rank, size=4, halo=halo)
        mine = x[:, share.first * per_patch:share.stop * per_patch]
        layer = nn.Sequential(nn.Dropout(p))
        draw_patch_slices(layer, share)
        assert torch.equal(dropped(layer, mine), whole[:, share.first * per_patch:share.stop * per_patch])
    assert not torch.equal(whole, x), "some units dropped"


@pytest.mark.parametrize("keys", [8, 40])  # small_attention; beyond SMALL_ATTENTION_MAX, where SDPA would draw its own
def test_a_tensor_parallel_rank_gets_its_heads_slice_of_the_whole_attention_mask(keys):
    torch.manual_seed(0)
    heads, dim = 4, 32
    block = layers.Block(dim, heads, mlp_ratio=2, dropout=0.2, norm_eps=1e-5)
    q, k, v = (torch.randn(2, 1, heads, keys, dim // heads) for _ in range(3))
    draw_whole_masks(block)
    whole = dropped(block.attn.drop, torch.ones(2, 1, heads, keys, keys))
    torch.manual_seed(7)
    out = layers.attention(q, k, v, None, block.attn.drop)
    for rank in range(2):
        draw_head_slices(block, rank, 2, heads)
        assert isinstance(block.drop, SlicedDropout) and block.drop.axis == 0, "the residual stream is replicated"
        mine = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(dropped(block.attn.drop, torch.ones(2, 1, 2, keys, keys)), whole[:, :, mine])
        torch.manual_seed(7)
        ours = layers.attention(q[:, :, mine], k[:, :, mine], v[:, :, mine], None, block.attn.drop)
        torch.testing.assert_close(ours, out[:, :, mine], atol=1e-6, rtol=1e-6)


def test_attention_over_many_keys_keeps_sdpa_with_torch_dropout_and_in_evaluation(monkeypatch):
    """Only a dropout that draws its own masks, in training, takes the weights' path."""
    calls = []
    monkeypatch.setattr(layers, "small_attention", lambda *args: calls.append(args) or args[0])
    attn = Attention(32, 4, dropout=0.1)
    h = torch.randn(1, 1, 40, 32)
    attn(h), attn.eval()(h)
    draw_whole_masks(attn)
    attn.eval()(h)
    assert calls == []
    attn.train()(h)
    assert len(calls) == 1
