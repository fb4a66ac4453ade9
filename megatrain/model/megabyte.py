"""MEGABYTE (Yu et al. 2023, arXiv 2305.07185), read top to bottom beside Section 2.

The model is a flat list of layers so that a pipeline can cut it anywhere in the
global model without a second copy of any layer's code:

    GlobalEmbedding -> StageBlock x global_layers
      -> StageInput (w_GL) -> StageBlock x local_layers -> Head

(with optional mid stages, each a StageInput and its blocks, between the two).
Every layer after the first maps a tuple (h, x) to (h, x): h is the stage's
activation [B, n, m, D] (see layers.py), x the byte ids [B, T] that the
embeddings of lower stages need. Byte ids travel as an integer tensor, so they
need no gradient when a pipeline sends them between stages.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .config import VOCAB_SIZE, MegabyteConfig, StageConfig
from .layers import Block, CausalConvEncoder, in_autocast_dtype

State = tuple[torch.Tensor, torch.Tensor]
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"  # an exported model folder


# The standard deviation of a standard normal cut at +-2: cutting narrows the spread.
TRUNCATED_AT_2_STD = 0.8796256610342398


def _init(module: nn.Module, std: float) -> None:
    """Truncated-normal init (Appendix A) of every weight matrix, embedding and pad: a normal
    cut at two of its standard deviations, widened so that the weights' std is `std`."""
    sigma = std / TRUNCATED_AT_2_STD
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(param)
        elif param.dim() >= 2 or name in ("pad", "pos_embed"):
            nn.init.trunc_normal_(param, std=sigma, a=-2 * sigma, b=2 * sigma)
    for norm in (m for m in module.modules() if isinstance(m, nn.LayerNorm)):
        norm.reset_parameters()


class GlobalEmbedding(nn.Module):
    """Patch embedder and the one-patch shift (Section 2, steps 1-2).

    h_embed[t] = E_global_embed[x_t] + E_pos[t]; P consecutive rows are concatenated
    into one patch of width P * D_G (no projection); the global input is the learned
    pad patch followed by patches 0..K-2.
    """

    def __init__(self, cfg: MegabyteConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        d = cfg.global_embed_dim
        self.byte_embed = nn.Embedding(VOCAB_SIZE, d)
        self.pos_embed = nn.Parameter(torch.empty(cfg.seq_len, d))
        self.pad = nn.Parameter(torch.empty(cfg.global_dim))
        self.conv = CausalConvEncoder(d) if cfg.conv_encoder else None
        _init(self, cfg.init_std)

    def forward(self, x: torch.Tensor) -> State:
        B, T = x.shape
        e = self.byte_embed(x)
        if self.conv is not None:
            e = self.conv(e)
        patches = (e + self.pos_embed[:T]).reshape(B, T // self.patch_size, -1)
        h = torch.cat((self.pad.expand(B, 1, -1), patches[:, :-1]), dim=1)
        return in_autocast_dtype(h.unsqueeze(1)), x  # one unit of K positions: [B, 1, K, P * D_G]


class StageBlock(Block):
    """A transformer block of stage `stage` (0 = global) that passes the byte ids on."""

    def __init__(self, cfg: MegabyteConfig, stage: int) -> None:
        s = cfg.stages[stage]
        super().__init__(s.dim, s.heads, cfg.mlp_ratio, cfg.dropout, cfg.norm_eps,
                         cross_patch=cfg.cross_patch if stage > 0 else 0)
        _init(self, cfg.init_std)

    def forward(self, state: State) -> State:  # type: ignore[override]
        h, x = state
        return super().forward(h), x


class StageInput(nn.Module):
    """From the stage above to stage `stage` (Section 2, steps 3-4: global to local).

    The output of the stage above for a patch (width D_above) is normalised, split into
    its `units` slices and each slice is projected by ONE shared matrix (w_GL); unit p
    then adds the learned pad (p = 0) or the embedding of unit p-1's bytes, so that
    inside a patch the input is shifted by one unit.
    """

    def __init__(self, cfg: MegabyteConfig, stage: int) -> None:
        super().__init__()
        above, s = cfg.stages[stage - 1], cfg.stages[stage]
        self.units = above.patch_size // s.patch_size
        self.norm = nn.LayerNorm(above.dim, eps=cfg.norm_eps)  # final norm of the stage above
        self.proj = nn.Linear(above.dim // self.units, s.dim, bias=False)  # w_GL
        self.byte_embed = nn.Embedding(VOCAB_SIZE, s.dim // s.patch_size)  # E_local_embed
        self.pad = nn.Parameter(torch.empty(s.dim))  # E_local_pad
        _init(self, cfg.init_std)

    def forward(self, state: State) -> State:
        h, x = state  # h: [B, n, m, D_above]; x: the bytes of those n * m patches
        B, n, m, _ = h.shape
        patches = n * m
        context = self.proj(self.norm(h).reshape(B, patches, self.units, -1))
        e = self.byte_embed(x).reshape(B, patches, self.units, -1)
        shifted = torch.cat((self.pad.expand(B, patches, 1, -1), e[:, :, :-1]), dim=2)
        return in_autocast_dtype(context + shifted), x


class Head(nn.Module):
    """Byte logits: softmax(E_local_embed . norm(h_local_out)) (Section 2, step 5)."""

    def __init__(self, cfg: MegabyteConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.local_dim, eps=cfg.norm_eps)
        self.out = nn.Linear(cfg.local_dim, VOCAB_SIZE, bias=False)
        _init(self, cfg.init_std)

    def forward(self, state: State) -> torch.Tensor:
        h, _ = state
        return self.out(self.norm(h)).reshape(h.shape[0], -1, VOCAB_SIZE)  # [B, T, 256]


LayerSpec = tuple[type[nn.Module], tuple]


def layer_specs(cfg: MegabyteConfig) -> list[LayerSpec]:
    """The model as a flat list of (layer class, constructor args), coarsest stage first."""
    specs: list[LayerSpec] = [(GlobalEmbedding, (cfg,))]
    for i, stage in enumerate(cfg.stages):
        if i > 0:
            specs.append((StageInput, (cfg, i)))
        specs.extend([(StageBlock, (cfg, i))] * stage.layers)
    specs.append((Head, (cfg,)))
    return specs


def tie_local_embedding(layers: Iterable[nn.Module]) -> None:
    """Share E_local_embed between the byte-level StageInput and the Head (paper step 5)."""
    layers = list(layers)
    stage_input = next(m for m in reversed(layers) if isinstance(m, StageInput))
    head = next(m for m in layers if isinstance(m, Head))
    head.out.weight = stage_input.byte_embed.weight


class Megabyte(nn.Module):
    """The single-device reference model: forward(x [B, T]) -> logits [B, T, 256].

    Logits at position t predict byte t from bytes < t. T may be any length up to
    seq_len: the sequence is padded on the right to whole patches and the padding's
    logits are dropped (causality makes them irrelevant to the kept ones).
    """

    def __init__(self, cfg: MegabyteConfig) -> None:
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise ValueError("; ".join(f"{field}: {msg}" for field, msg in problems))
        self.config = cfg
        self.layers = nn.ModuleList(cls(*args) for cls, args in layer_specs(cfg))
        if cfg.tie_local_embedding:
            tie_local_embedding(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence of {T} bytes exceeds seq_len {self.config.seq_len}")
        P = self.config.patch_size
        state = F.pad(x, (0, -T % P))
        for layer in self.layers:
            state = layer(state)
        return state[:, :T]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `model.safetensors` (the weights in their dtype; a tied weight once) and
        `config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Megabyte":
        """Load a folder written by `save_pretrained` (`python -m megatrain.checkpoint export CKPT DIR`):
        safetensors weights and a JSON config, no pickle."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name} (not an exported megatrain model folder)")
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text())
            stages = tuple(StageConfig(**stage) for stage in raw.pop("mid_stages", ()))
            cfg = MegabyteConfig(**raw, mid_stages=stages)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{directory / CONFIG_FILE}: not a MEGABYTE config ({e})") from None
        model = cls(cfg)
        try:
            load_model(model, str(directory / WEIGHTS_FILE), strict=True)
        except (SafetensorError, RuntimeError) as e:  # a damaged file, or weights of another shape
            raise ValueError(f"{directory / WEIGHTS_FILE}: {e}") from None
        return model.to(device).eval()


def bytes_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats over every byte (byte 0 included); / ln 2 for bits per byte."""
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), targets.reshape(-1))
