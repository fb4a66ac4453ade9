"""The pipeline x tensor x data layout of a run, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatrain.config import RunConfig
from megatrain.model import StageBlock

from .cost import pieces
from .partition import WEIGHTS as PARTITION_METHODS


class LayoutError(ValueError):
    """A parallel layout that cannot run this model on this many ranks."""


@dataclass(frozen=True)
class Layout:
    pp: int  # pipeline stages
    tp: int  # tensor-parallel ranks (the local model is data-parallel over patches on them)
    dp: int  # data-parallel replicas

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    def topology(self) -> PipeModelDataParallelTopology:
        """DeepSpeed's process grid; tensor-parallel ranks are adjacent (fastest axis)."""
        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)


def layout_problems(cfg: RunConfig, world_size: int) -> list[str]:
    """Every reason why cfg.parallel (pp, tp) cannot run cfg.model on `world_size` ranks."""
    pp, tp, m = cfg.parallel.pp, cfg.parallel.tp, cfg.model
    if pp < 1 or tp < 1:
        return [f"pp and tp must be positive, got pp={pp} tp={tp}"]
    out = []
    if world_size % (pp * tp):
        out.append(f"pp * tp = {pp} * {tp} = {pp * tp} does not divide the world size {world_size}")
    if m.global_heads % tp:
        out.append(f"model.global_heads={m.global_heads} is not divisible by tp={tp}")
    if (m.mlp_ratio * m.global_dim) % tp:
        out.append(f"the global MLP width {m.mlp_ratio * m.global_dim} (mlp_ratio * global_dim) "
                   f"is not divisible by tp={tp}")
    if m.num_patches % tp:
        out.append(f"the {m.num_patches} patches of a sequence (seq_len / patch_size) cannot be "
                   f"shared evenly by tp={tp} ranks")
    starts = len(pieces(m))
    if pp > starts:
        out.append(f"pp={pp} stages need at least {pp} places to start, the model has {starts} (embedding, "
                   f"{m.global_layers} global and {m.local_layers} local blocks of {len(StageBlock.BRANCHES)} "
                   f"branches each, stage inputs, head)")
    t = cfg.train
    if t.global_batch_size and not world_size % (pp * tp):
        dp = world_size // (pp * tp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            out.append(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size "
                       f"x dp = {t.micro_batch_size} x {dp}: change either, or the number of ranks")
    if problem := t.checkpoint_blocks_problem(pp):
        out.append(f"train.checkpoint_blocks {problem}")
    if cfg.parallel.partition_method not in PARTITION_METHODS:
        out.append(f"parallel.partition_method={cfg.parallel.partition_method!r} is not one of "
                   f"{', '.join(PARTITION_METHODS)}")
    return out


def plan_layout(cfg: RunConfig, world_size: int) -> Layout:
    """The layout of cfg.parallel on `world_size` ranks (dp = world / (pp * tp)), or LayoutError."""
    problems = layout_problems(cfg, world_size)
    if problems:
        raise LayoutError("invalid parallel layout:\n  " + "\n  ".join(problems))
    pp, tp = cfg.parallel.pp, cfg.parallel.tp
    return Layout(pp, tp, world_size // (pp * tp))
