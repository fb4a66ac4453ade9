import pytest
import torch
import torch.nn.functional as F

from megatrain.model import layers
from megatrain.model.layers import Attention, small_attention


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cross", [False, True])
def test_small_attention_equals_sdpa_forward_and_backward(dtype, tol, cross):
    torch.manual_seed(0)
    m, r = 8, 3 if cross else 0
    q = torch.randn(6, 4, m, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(6, 4, r + m, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    mask = torch.cat((torch.rand(6, 1, m, r) > 0.5, causal.expand(6, 1, m, m)), dim=-1)  # cross-patch's shape
    grad = torch.randn(6, 4, m, 16, dtype=dtype)
    outs = []
    for attend in (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                   lambda: small_attention(q, k, v, mask)):
        q.grad = k.grad = v.grad = None
        out = attend()
        out.backward(grad)
        outs.append((out, q.grad, k.grad, v.grad))
    for ours, theirs in zip(*outs):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


@pytest.mark.parametrize("cross_patch", [0, 2])
def test_attention_layer_gives_the_same_on_both_sides_of_the_threshold(cross_patch, monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 4, dropout=0.0, cross_patch=cross_patch)
    h = torch.randn(2, 5, 8, 64)
    small = attn(h)
    monkeypatch.setattr(layers, "SMALL_ATTENTION_MAX", 0)  # SDPA everywhere
    torch.testing.assert_close(small, attn(h), atol=1e-5, rtol=1e-5)
