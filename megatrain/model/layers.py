"""Transformer building blocks shared by every stage of MEGABYTE.

Activations of a stage are laid out as [B, n, m, D]: B sequences, n independent
units (patches of the stage above; n = 1 for the global model), m positions per
unit, width D. Attention runs over m, causally, with B * n as the batch.

Tensor parallelism replaces `Attention.qkv`/`Attention.proj` and `MLP.fc1`/`MLP.fc2`
with column/row-parallel linears that hold a slice of the heads (megatrain.parallel);
nothing here knows about it: the number of heads is read off `qkv`'s output size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoFormer) of x[..., L, head_dim] at integer positions [L]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# Up to this many keys per unit, attention is two batched matmuls and a masked softmax:
# fused kernels (FlashAttention) work in 128-row tiles and, over the 8 bytes of a local
# patch, spend most of their work and backward scratch on padding. Measured on CPU by
# bench/local_attention.py: faster up to 32 keys in fp32 and bf16, slower at 64 in fp32.
SMALL_ATTENTION_MAX = 32


def small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    drop: nn.Module | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) where mask, else -inf) v, for q [..., m, d], k and v [..., keys, d]
    and a boolean mask broadcast to [..., m, keys]; the softmax in fp32, as SDPA's; `drop`
    (a dropout) on the weights."""
    scores = (q @ k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)
    weights = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    return (weights if drop is None else drop(weights)) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              drop: nn.Module) -> torch.Tensor:
    """Attention of q [B, n, heads, m, d] over k, v [B, n, heads, keys, d], causal where mask is
    None, else where a boolean mask [n, 1, m, keys] holds: SDPA, with its fused dropout, over
    many keys; `small_attention` over few, or where `drop` is not an nn.Dropout (a dropout
    that draws its masks itself, as megatrain.parallel's layout-invariant one, needs the weights)."""
    B, n, heads, m, d = q.shape
    keys = k.shape[-2]
    if keys > SMALL_ATTENTION_MAX and (isinstance(drop, nn.Dropout) or not drop.training):
        flat = [t.reshape(B * n, heads, -1, d) for t in (q, k, v)]
        mask = None if mask is None else mask.expand(B, n, 1, m, keys).reshape(B * n, 1, m, keys)
        out = F.scaled_dot_product_attention(*flat, attn_mask=mask, dropout_p=drop.p if drop.training else 0.0,
                                             is_causal=mask is None)
        return out.view(B, n, heads, m, d)
    if mask is None:
        mask = torch.ones(m, keys, dtype=torch.bool, device=q.device).tril()
    return small_attention(q, k, v, mask, drop)


def in_autocast_dtype(h: torch.Tensor) -> torch.Tensor:
    """h in autocast's dtype where autocast is on: a stage's input is the start of its
    residual stream, which fp32 tables (embeddings, pads) would otherwise keep in fp32."""
    kind = h.device.type
    return h.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else h


@dataclass
class KVCache:
    """Keys and values of one attention layer for the positions of the current unit.

    Keys are kept before the rotary embedding: the previous unit's last r keys
    (cross-patch attention) take new relative positions when a unit starts.
    """

    k: torch.Tensor | None = None  # [B, heads, positions, head_dim]
    v: torch.Tensor | None = None
    prev_k: torch.Tensor | None = None  # the previous unit's last r keys, or None
    prev_v: torch.Tensor | None = None

    def next_unit(self, keep_last: int) -> None:
        """Start a new unit, keeping the last `keep_last` positions for cross-patch attention."""
        if keep_last and self.k is not None:
            self.prev_k, self.prev_v = self.k[:, :, -keep_last:], self.v[:, :, -keep_last:]
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)


class Attention(nn.Module):
    """Causal multi-head self-attention over the m positions of each unit.

    With `cross_patch = r > 0` (paper Section 2.3.2) the keys and values of every
    layer also include the last r positions of the previous unit (none for the
    first unit of a sequence), and rotary embeddings give relative positions.
    """

    def __init__(self, dim: int, heads: int, dropout: float, cross_patch: int = 0) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.cross_patch = cross_patch
        self.drop = nn.Dropout(dropout)  # on the attention weights
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each [B, n, heads, m, head_dim], from the output of `qkv` [B, n, m, 3 * heads * head_dim]
        (the heads being this rank's under tensor parallelism)."""
        B, n, m, _ = qkv.shape
        return qkv.view(B, n, m, 3, -1, self.head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, n, m, _ = h.shape
        q, k, v = self.split_heads(self.qkv(h))
        out = self._cross_patch_attention(q, k, v) if self.cross_patch else attention(q, k, v, None, self.drop)
        return self.proj(out.transpose(2, 3).reshape(B, n, m, -1))

    def step(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attention output for one new position h [B, D] of the current unit (generation)."""
        B = h.shape[0]
        q, k, v = self.qkv(h).view(B, 3, -1, 1, self.head_dim).unbind(1)  # [B, heads, 1, hd]
        cache.append(k, v)
        keys, values = cache.k, cache.v
        if self.cross_patch:
            position = keys.shape[2] - 1
            keys = rotary(keys, torch.arange(keys.shape[2], device=h.device))
            q = rotary(q, torch.tensor([position], device=h.device))
            if cache.prev_k is not None:
                prev = rotary(cache.prev_k, torch.arange(-self.cross_patch, 0, device=h.device))
                keys, values = torch.cat((prev, keys), dim=2), torch.cat((cache.prev_v, values), dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)  # the new position sees all cached
        return self.proj(out.reshape(B, -1))

    def _cross_patch_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, m, r = q.shape[1], q.shape[3], self.cross_patch
        # Keys/values of the previous unit's last r positions; unit 0 gets zeros, masked below.
        k_prev = F.pad(k[:, :-1, :, -r:], (0, 0, 0, 0, 0, 0, 1, 0))
        v_prev = F.pad(v[:, :-1, :, -r:], (0, 0, 0, 0, 0, 0, 1, 0))
        positions = torch.arange(-r, m, device=q.device)
        q = rotary(q, positions[r:])
        k = rotary(torch.cat((k_prev, k), dim=3), positions)
        v = torch.cat((v_prev, v), dim=3)
        causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        has_prev = (torch.arange(n, device=q.device) > 0)[:, None, None].expand(n, m, r)
        mask = torch.cat((has_prev, causal.expand(n, m, m)), dim=2)[:, None]  # [n, 1, m, r + m]
        return attention(q, k, v, mask, self.drop)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))


def residual_branch(h: torch.Tensor, norm: nn.Module, f: nn.Module, drop: nn.Module) -> torch.Tensor:
    """h + dropout(f(norm(h))): one pre-norm residual branch."""
    return h + drop(f(norm(h)))


class Block(nn.Module):
    """Pre-norm transformer block (Appendix A); dropout on both residual branches."""

    # Each residual branch's (norm, function) attributes, in order: a pipeline stage may
    # start between them, at the MLP branch.
    BRANCHES = {"attention": ("norm1", "attn"), "mlp": ("norm2", "mlp")}

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, norm_eps: float,
                 cross_patch: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, dropout, cross_patch)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_ratio * dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = residual_branch(h, self.norm1, self.attn, self.drop)
        return residual_branch(h, self.norm2, self.mlp, self.drop)

    def step(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new position h [B, D] with the unit's cached keys and values (eval mode)."""
        h = h + self.attn.step(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


class CausalConvEncoder(nn.Module):
    """Causal 1-D convolutions over byte embeddings (paper Section 2.3.1).

    Residual layers with kernels 3, 5 and 7, left-padded so position t sees t-k+1..t.
    """

    KERNELS = (3, 5, 7)
    RECEPTIVE_FIELD = 1 + sum(k - 1 for k in KERNELS)  # bytes an output position depends on

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, k) for k in self.KERNELS)

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        x = e.transpose(1, 2)
        for conv in self.convs:
            x = x + conv(F.pad(x, (conv.kernel_size[0] - 1, 0)))
        return x.transpose(1, 2)
