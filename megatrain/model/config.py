"""The MEGABYTE model's hyperparameters (paper notation in comments)."""

from __future__ import annotations

from dataclasses import dataclass

VOCAB_SIZE = 256  # bytes; byte 0 is an ordinary byte, there are no special ids


@dataclass(frozen=True)
class StageConfig:
    """An intermediate stage between the global and the local model (beyond the paper).

    It models units of `patch_size` bytes inside each unit of the stage above it,
    the same way the local model models bytes inside a global patch.
    """

    patch_size: int
    dim: int
    layers: int
    heads: int


@dataclass(frozen=True)
class MegabyteConfig:
    seq_len: int = 8192  # T, bytes per sequence
    patch_size: int = 8  # P: bytes per global patch (K = T / P patches)
    global_dim: int = 2048  # P * D_G: the global model's width
    global_layers: int = 14
    global_heads: int = 16
    local_dim: int = 1024  # D_L
    local_layers: int = 18
    local_heads: int = 16
    mid_stages: tuple[StageConfig, ...] = ()  # e.g. patch sizes 64 -> (8) -> 1
    mlp_ratio: int = 4
    dropout: float = 0.1  # inside blocks; none on embeddings (Appendix A)
    init_std: float = 0.006  # truncated normal (Appendix A)
    norm_eps: float = 1e-5
    cross_patch: int = 0  # r: local attention also sees the last r positions of the previous patch
    conv_encoder: bool = False  # causal convolutions (kernels 3, 5, 7) before patching
    tie_local_embedding: bool = True  # logits = E_local_embed . h_local_out (Section 2, eq. 5)

    def __post_init__(self) -> None:
        for stage in self.mid_stages:
            if not isinstance(stage, StageConfig):
                raise TypeError(f"mid_stages must hold StageConfig, got {type(stage).__name__}")

    @property
    def stages(self) -> tuple[StageConfig, ...]:
        """All stages, coarsest first: global, mid stages, local (unit of one byte)."""
        top = StageConfig(self.patch_size, self.global_dim, self.global_layers, self.global_heads)
        bottom = StageConfig(1, self.local_dim, self.local_layers, self.local_heads)
        return (top, *self.mid_stages, bottom)

    @property
    def num_patches(self) -> int:  # K
        return self.seq_len // self.patch_size

    @property
    def global_embed_dim(self) -> int:  # D_G
        return self.global_dim // self.patch_size

    def _stage_fields(self) -> list[tuple[str, str, str]]:
        """(width, heads, patch size) field names of each stage, for error messages."""
        mids = [(f"mid_stages[{i}].dim", f"mid_stages[{i}].heads", f"mid_stages[{i}].patch_size")
                for i in range(len(self.mid_stages))]
        return [("global_dim", "global_heads", "patch_size"), *mids,
                ("local_dim", "local_heads", "mid_stages")]

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for each inconsistency; empty when the config is usable."""
        out: list[tuple[str, str]] = []
        for name in ("seq_len", "patch_size", "global_dim", "global_layers", "global_heads",
                     "local_dim", "local_layers", "local_heads", "mlp_ratio"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be positive, got {getattr(self, name)}"))
        if out:
            return out
        if self.seq_len % self.patch_size:
            out.append(("seq_len", f"{self.seq_len} is not divisible by patch_size {self.patch_size}"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.cross_patch < 0:
            out.append(("cross_patch", f"must be >= 0, got {self.cross_patch}"))
        stages = self.stages
        for i, (stage, (dim, heads, patch)) in enumerate(zip(stages, self._stage_fields())):
            if stage.dim % stage.patch_size:
                out.append((dim, f"{stage.dim} is not divisible by patch_size {stage.patch_size}"))
            if stage.dim % stage.heads:
                out.append((heads, f"{stage.heads} heads do not divide width {stage.dim}"))
            elif i > 0 and self.cross_patch and (stage.dim // stage.heads) % 2:
                out.append((heads, "rotary embeddings (cross_patch) need an even head size"))
            if i == 0:
                continue
            parent = stages[i - 1]
            if parent.patch_size <= stage.patch_size or parent.patch_size % stage.patch_size:
                out.append((patch, "patch sizes must strictly decrease, each dividing the one "
                                   f"above: {parent.patch_size} -> {stage.patch_size}"))
                continue
            units = parent.patch_size // stage.patch_size
            if parent.dim % units:
                out.append((dim, f"the width {parent.dim} of the stage above is not divisible "
                                 f"by its {units} units per patch"))
            if self.cross_patch > units:
                out.append(("cross_patch", f"r={self.cross_patch} exceeds the {units} positions "
                                           "of a patch"))
        return out
