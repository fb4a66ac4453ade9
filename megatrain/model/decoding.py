"""Byte-by-byte decoding with key/value caches in every stage (paper Section 2, generation).

A stage steps once per unit: the global model once per patch, the local model once
per byte. So a patch costs L_global + P * L_local sequential layer steps instead of
the P * (L_global + L_local) of recomputing the whole model for every byte. A prompt
fills the caches in one batched pass (`prefill`) instead of byte by byte.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .layers import KVCache
from .megabyte import GlobalEmbedding, Head, Megabyte, StageBlock, StageInput


class PreallocatedKVCache(KVCache):
    """The cache of a model whose positions are never dropped (the global model, a plain
    transformer), written in place into buffers of `capacity` positions: appending costs
    one position's copy, where torch.cat copies the whole cache (quadratic over thousands).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.size = 0
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.size + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"cache is full: {self.capacity} positions")
        if self.buffers is None:
            B, heads, _, head_dim = k.shape
            self.buffers = (k.new_empty(B, heads, self.capacity, head_dim),
                            v.new_empty(B, heads, self.capacity, head_dim))
        for buffer, new in zip(self.buffers, (k, v)):
            buffer[:, :, self.size:end] = new
        self.size = end
        self.k, self.v = (buffer[:, :, :end] for buffer in self.buffers)

    def next_unit(self, keep_last: int) -> None:
        raise TypeError("a PreallocatedKVCache holds one unit: the whole sequence")


class IncrementalDecoder:
    """Feed a prompt with `prefill` and bytes with `push`; `next_logits()` gives the logits
    [B, 256] for the next byte.

    Holds the bytes so far and one key/value cache per attention layer. Equal (to float
    rounding) to `model(x)[:, t]` for every position t < seq_len.
    """

    def __init__(self, model: Megabyte, batch_size: int = 1) -> None:
        self.model = model.eval()
        self.cfg = model.config
        layers = list(model.layers)
        self.embed: GlobalEmbedding = layers[0]
        self.head: Head = layers[-1]
        self.inputs: list[StageInput | None] = [None]  # stage s > 0 starts with a StageInput
        self.blocks: list[list[StageBlock]] = [[]]
        for layer in layers[1:-1]:
            if isinstance(layer, StageInput):
                self.inputs.append(layer)
                self.blocks.append([])
            else:
                self.blocks[-1].append(layer)
        self.unit_bytes = [s.patch_size for s in self.cfg.stages]
        self.caches = [[KVCache() for _ in blocks] for blocks in self.blocks]
        self.caches[0] = [PreallocatedKVCache(self.cfg.num_patches) for _ in self.blocks[0]]
        self.outputs: list[torch.Tensor | None] = [None] * len(self.blocks)  # current unit's output
        self.stepped_at = [-1] * len(self.blocks)  # byte at which each stage last stepped
        device = next(model.parameters()).device
        self.bytes = torch.empty(batch_size, 0, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return self.bytes.shape[1]

    def push(self, byte: torch.Tensor) -> None:
        """Append one byte per sequence (LongTensor [B])."""
        if self.length >= self.cfg.seq_len:
            raise ValueError(f"context is full: seq_len is {self.cfg.seq_len} bytes")
        self.bytes = torch.cat((self.bytes, byte.view(-1, 1).to(self.bytes)), dim=1)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Take a whole prompt (LongTensor [B, n]) in one batched pass: the state of n pushes.

        The model's layers run over the prompt padded to whole patches (the padding comes
        after every kept position, so causality leaves the kept ones exact), and each
        attention layer keeps the keys and values that the byte-by-byte path would hold:
        every started patch in the global model, the current unit's started positions
        (and, with cross-patch attention, the previous unit's last r) below it.
        """
        if self.length:
            raise ValueError(f"prefill needs an empty decoder, this one holds {self.length} bytes")
        n, P = prompt.shape[1], self.cfg.patch_size
        if n > self.cfg.seq_len:
            raise ValueError(f"prompt of {n} bytes exceeds seq_len {self.cfg.seq_len}")
        self.bytes = prompt.to(self.bytes)
        if n == 0:
            return
        h, x = self.embed(F.pad(self.bytes, (0, -n % P)))
        base = 0  # first byte of x: the lower stages may run on the last patch only
        for s, blocks in enumerate(self.blocks):
            if s == 1 and not self.cfg.cross_patch:  # each patch's lower stages see only that patch
                base = x.shape[1] - P
                h, x = h[:, :, -1:], x[:, -P:]
            if s > 0:
                h, x = self.inputs[s]((h, x))
            h, kvs = self._run_blocks(blocks, h, x)
            self._keep(s, h, kvs, n - 1 - base, base)

    @staticmethod
    def _run_blocks(blocks: list[StageBlock], h: torch.Tensor,
                    x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The blocks' output over h [B, n, m, D] and each block's keys and values [B, n, heads, m, hd]."""
        kvs = []
        for block in blocks:
            out: list[torch.Tensor] = []  # the qkv projection, taken as attention computes it
            hook = block.attn.qkv.register_forward_hook(lambda _m, _i, qkv: out.append(qkv))
            try:
                h, x = block((h, x))
            finally:
                hook.remove()
            _, k, v = block.attn.split_heads(out[0])
            kvs.append((k, v))
        return h, kvs

    def _keep(self, s: int, h: torch.Tensor, kvs: list[tuple[torch.Tensor, torch.Tensor]],
              last: int, base: int) -> None:
        """Stage s's caches and output as stepping would leave them after byte `last` of x."""
        unit = self.unit_bytes[s]
        position = last // unit  # the stage's last started position, counted from x's start
        q, j = divmod(position, h.shape[2])  # its unit of the stage above, and place in it
        self.stepped_at[s] = base + position * unit
        self.outputs[s] = h[:, q, j]
        r = self.cfg.cross_patch if s > 0 else 0
        for (k, v), cache in zip(kvs, self.caches[s]):
            cache.append(k[:, q, :, :j + 1], v[:, q, :, :j + 1])
            if r and q > 0:
                cache.prev_k, cache.prev_v = k[:, q - 1, :, -r:], v[:, q - 1, :, -r:]

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        t = self.length
        if t >= self.cfg.seq_len:
            raise ValueError(f"context is full: seq_len is {self.cfg.seq_len} bytes")
        for s, unit in enumerate(self.unit_bytes):
            if t % unit == 0 and self.stepped_at[s] != t:
                self._step_stage(s, t)
        h = self.outputs[-1]
        return self.head((h.view(h.shape[0], 1, 1, -1), None))[:, 0]

    def _step_stage(self, s: int, t: int) -> None:
        """Run stage s for the unit that starts at byte t."""
        self.stepped_at[s] = t
        unit = self.unit_bytes[s]
        if s == 0:
            h = self._global_input(t)
        else:
            parent_unit = self.unit_bytes[s - 1]
            j = (t % parent_unit) // unit  # position inside the parent unit
            if j == 0:
                for cache in self.caches[s]:
                    cache.next_unit(self.cfg.cross_patch)
            layer = self.inputs[s]
            above = layer.norm(self.outputs[s - 1])
            context = layer.proj(above.view(above.shape[0], layer.units, -1)[:, j])
            if j == 0:
                shifted = layer.pad.expand_as(context)
            else:
                shifted = layer.byte_embed(self.bytes[:, t - unit:t]).flatten(1)
            h = context + shifted
        for block, cache in zip(self.blocks[s], self.caches[s]):
            h = block.step(h, cache)
        self.outputs[s] = h

    def _global_input(self, t: int) -> torch.Tensor:
        """The global model's input at patch t / P: the pad, or the embedding of the patch before."""
        B, P = self.bytes.shape[0], self.cfg.patch_size
        if t == 0:
            return self.embed.pad.expand(B, -1)
        start = t - P
        if self.embed.conv is not None:  # its causal convolutions need earlier bytes
            start = max(0, start - (self.embed.conv.RECEPTIVE_FIELD - 1))
        e = self.embed.byte_embed(self.bytes[:, start:t])
        if self.embed.conv is not None:
            e = self.embed.conv(e)
        e = e[:, -P:] + self.embed.pos_embed[t - P:t]
        return e.reshape(B, -1)


def uncached_next_logits(model: Megabyte, x: torch.Tensor) -> torch.Tensor:
    """Next-byte logits [B, 256] by running the whole model on x [B, t] (t may be 0)."""
    with torch.no_grad():  # a placeholder byte at position t: its logits see only bytes < t
        return model(F.pad(x, (0, 1)))[:, -1]


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator) -> torch.Tensor:
    """One byte per row of logits [B, 256]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double() / temperature  # float64: cached and uncached rounding must not flip draws
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


def context_start(length: int, seq_len: int, patch_size: int) -> int:
    """First byte of the context window once `length` bytes exist.

    Past seq_len the window jumps forward by half a context (whole patches), so the
    cached decoder prefills seq_len / 2 bytes once per seq_len / 2 generated bytes.
    """
    if length < seq_len:
        return 0
    hop = max(patch_size, seq_len // 2 // patch_size * patch_size)
    return ((length - seq_len) // hop + 1) * hop


def byte_ids(data: bytes | bytearray, device: torch.device) -> torch.Tensor:
    """One sequence of byte ids, LongTensor [1, len(data)]."""
    return torch.tensor([list(data)], dtype=torch.long, device=device)


def generate(model: Megabyte, prompt: bytes, max_bytes: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: bytes = b"",
             use_cache: bool = True) -> Iterator[int]:
    """Yield up to max_bytes new bytes after `prompt`, stopping after `stop` appears."""
    cfg = model.config
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    text = bytearray(prompt)
    decoder, window = None, -1
    for _ in range(max_bytes):
        start = context_start(len(text), cfg.seq_len, cfg.patch_size)
        if use_cache:
            if start != window:  # (re)fill the caches with the window's bytes, in one pass
                decoder, window = IncrementalDecoder(model), start
                decoder.prefill(byte_ids(text[start:], device))
            logits = decoder.next_logits()
        else:
            logits = uncached_next_logits(model, byte_ids(text[start:], device))
        byte = sample(logits, temperature, top_k, top_p, generator)
        if decoder is not None:
            decoder.push(byte)
        text.append(int(byte))
        yield int(byte)
        if stop and text.endswith(stop):
            return
