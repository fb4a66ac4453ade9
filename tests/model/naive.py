"""MEGABYTE written straight from the paper's equations, one patch and one position at a time.

Independent of megatrain's layer code: it only reads the weights of a `Megabyte`.
Slow on purpose; used to check the batched model term by term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatrain.model import GlobalEmbedding, Head, Megabyte, StageBlock, StageInput


def _rotate(vec: torch.Tensor, pos: int) -> torch.Tensor:
    """Rotary embedding of one head vector: pair (i, i + d/2) rotated by pos * 10000^(-i/(d/2))."""
    half = vec.shape[0] // 2
    theta = torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=torch.float64)
    z = torch.complex(vec[:half].double(), vec[half:].double()) * torch.exp(1j * pos * theta)
    return torch.cat((z.real, z.imag)).to(vec.dtype)


def _block(block: StageBlock, seq: list[torch.Tensor], prev_kv=None, r: int = 0):
    """One pre-norm block over a list of position vectors; returns outputs and (k, v) lists."""
    a = block.attn
    d, hd = seq[0].shape[0], a.head_dim
    heads = d // hd
    wq, wk, wv = a.qkv.weight.split(d)
    normed = [F.layer_norm(h, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps) for h in seq]
    q = [wq @ h for h in normed]
    k = [wk @ h for h in normed]
    v = [wv @ h for h in normed]
    out = []
    for i, h in enumerate(seq):
        # keys visible to position i: the previous patch's last r (if any), then positions 0..i
        keys = [(j - r, prev_kv[0][len(prev_kv[0]) - r + j], prev_kv[1][len(prev_kv[1]) - r + j])
                for j in range(r)] if prev_kv else []
        keys += [(j, k[j], v[j]) for j in range(i + 1)]
        att = []
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            qh = _rotate(q[i][sl], i) if r else q[i][sl]
            scores = torch.stack([
                (qh @ (_rotate(kj[sl], pos) if r else kj[sl])) / math.sqrt(hd) for pos, kj, _ in keys
            ])
            weights = torch.softmax(scores, dim=0)
            att.append(sum(w * vj[sl] for w, (_, _, vj) in zip(weights, keys)))
        h = h + a.proj.weight @ torch.cat(att)
        m = block.mlp
        n2 = F.layer_norm(h, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        out.append(h + m.fc2.weight @ F.gelu(m.fc1.weight @ n2))
    return out, (k, v)


def naive_logits(model: Megabyte, x: torch.Tensor) -> torch.Tensor:
    """Logits [T, 256] for one sequence x [T] of a MEGABYTE of any number of stages.

    Stage s has patch size P_s (bytes per position: P for the global stage, 1 for the
    local one); its positions, in sequence order, are grouped into units of
    P_{s-1} / P_s positions (the global stage is one unit of K patches).
    """
    cfg = model.config
    layers = list(model.layers)
    emb: GlobalEmbedding = layers[0]
    head: Head = layers[-1]
    T, P = x.shape[0], cfg.patch_size
    K, D_G = T // P, cfg.global_embed_dim

    # 1. h_embed[t] = E_global_embed[x_t] (+ causal convolutions) + E_pos[t]
    e = [emb.byte_embed.weight[x[t]] for t in range(T)]
    if emb.conv is not None:
        for conv in emb.conv.convs:
            width = conv.kernel_size[0]
            e = [e[t] + conv.bias + sum(conv.weight[:, :, j] @ e[t - width + 1 + j]
                                        for j in range(width) if t - width + 1 + j >= 0)
                 for t in range(T)]
    e = [e[t] + emb.pos_embed[t] for t in range(T)]
    patches = [torch.cat(e[k * P:(k + 1) * P]) for k in range(K)]
    # 2. global input: pad patch, then patches 0..K-2
    h = [emb.pad] + patches[:-1]
    unit = K
    for s, stage in enumerate(cfg.stages):
        if s > 0:
            h, unit = _stage_input(layers, s, cfg, h, x), cfg.stages[s - 1].patch_size // stage.patch_size
        blocks = _stage_blocks(layers, s)
        prev = [None] * len(blocks)
        out = []
        for start in range(0, len(h), unit):
            z = h[start:start + unit]
            for i, block in enumerate(blocks):
                z, prev[i] = _block(block, z, prev[i] if start else None, cfg.cross_patch if s else 0)
            out += z
        h = out
    # 5. logits = E_local_embed . norm(h_local_out)
    return torch.stack([head.out.weight @ F.layer_norm(z, (cfg.local_dim,), head.norm.weight, head.norm.bias,
                                                       head.norm.eps) for z in h])


def _stage_blocks(layers: list, stage: int) -> list[StageBlock]:
    """The blocks of stage `stage`: those after its StageInput (the embedding, for stage 0)."""
    starts = [i for i, m in enumerate(layers) if isinstance(m, (GlobalEmbedding, StageInput))]
    end = starts[stage + 1] if stage + 1 < len(starts) else len(layers)
    return [m for m in layers[starts[stage] + 1:end] if isinstance(m, StageBlock)]


def _stage_input(layers: list, stage: int, cfg, above: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """3-4. Stage `stage`'s input from the outputs of the stage above (one per position of
    P_above bytes): each normalised output split into P_above / P_s slices, each slice
    through the one shared w_GL, plus E_pad (first slice) or the concatenated embeddings
    of the previous slice's P_s bytes."""
    to: StageInput = [m for m in layers if isinstance(m, StageInput)][stage - 1]
    width, size = cfg.stages[stage - 1].dim, cfg.stages[stage].patch_size
    units = cfg.stages[stage - 1].patch_size // size
    out = []
    for q, h in enumerate(above):
        g = F.layer_norm(h, (width,), to.norm.weight, to.norm.bias, to.norm.eps)
        for u in range(units):
            first = (q * units + u) * size  # the first byte of this position
            inp = torch.cat([to.byte_embed.weight[x[b]] for b in range(first - size, first)]) if u else to.pad
            out.append(to.proj.weight @ g[u * width // units:(u + 1) * width // units] + inp)
    return out
