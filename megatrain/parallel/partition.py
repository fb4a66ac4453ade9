"""Pipeline stages as the contiguous cut of the model whose costliest stage costs least.

A stage may start at any layer, the local model's included, or between a block's two
residual branches (attention, MLP): the local model runs once per byte, so at MEGABYTE's
proportions it is most of the FLOPs (text-1b 70%, 1m 91%), a few blocks of ~14% each
at text-1b's proportions, and a cut at whole blocks alone could not balance them. The
cut is exact (a min-max dynamic program over prefix sums), not DeepSpeed's heuristic
`partition_balanced`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

from megatrain.model import MegabyteConfig, StageBlock

from .cost import Piece, pieces

# Bytes a layer keeps on its stage per sequence of a micro-batch of one, fp32 with Adam:
# weights, gradients and two moments per parameter, and the activations kept for backward.
BYTES_PER_PARAM = 16
BYTES_PER_ACTIVATION = 4

WEIGHTS: dict[str, Callable[[Piece], float]] = {
    "flops": lambda p: p.cost.flops_per_byte,
    "memory": lambda p: BYTES_PER_PARAM * p.cost.params + BYTES_PER_ACTIVATION * p.cost.activations,
    "parameters": lambda p: p.cost.params,
    "uniform": lambda p: 1.0 if p.branch is None else 1 / len(StageBlock.BRANCHES),  # layers alike
}
FIRST_BRANCH, SECOND_BRANCH = StageBlock.BRANCHES


@dataclass(frozen=True)
class PipelineCut:
    """Stage s starts at layer parts[s] (parts[-1]: the number of layers), at its start or,
    for s in `inside`, at that block's MLP branch, its attention branch ending stage s-1."""

    parts: tuple[int, ...]
    inside: tuple[int, ...] = ()

    def layers(self, stage: int) -> range:
        """The layers stage `stage` holds, whole or one branch of."""
        return range(self.parts[stage], self.parts[stage + 1] + (stage + 1 in self.inside))

    def branch(self, stage: int, layer: int) -> str | None:
        """The branch of `layer` that `stage` holds, or None where it holds the whole layer."""
        if layer == self.parts[stage] and stage in self.inside:
            return SECOND_BRANCH
        if layer == self.parts[stage + 1] and stage + 1 in self.inside:
            return FIRST_BRANCH
        return None

    def stage_pieces(self, cfg: MegabyteConfig, whole_masks: bool = False) -> list[list[Piece]]:
        """Each stage's pieces of the model (`cost.pieces`)."""
        found = pieces(cfg, whole_masks)
        return [[p for p in found if p.layer in self.layers(s) and self.branch(s, p.layer) in (None, p.branch)]
                for s in range(len(self.parts) - 1)]


def min_max_cut(weights: list[float], stages: int) -> list[int]:
    """Boundaries [0, b1, ..., len(weights)] of `stages` non-empty contiguous parts whose
    largest sum is the least possible (of equal bottlenecks: the one cutting latest)."""
    n = len(weights)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} non-empty stages")
    prefix = [0.0, *accumulate(weights)]
    INF = float("inf")
    # best[k][i]: the least bottleneck of the first i layers in k parts; cut[k][i] its last cut
    best = [[INF] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                bottleneck = max(best[k - 1][j], prefix[i] - prefix[j])
                if bottleneck <= best[k][i]:
                    best[k][i], cut[k][i] = bottleneck, j
    parts = [n]
    for k in range(stages, 0, -1):
        parts.append(cut[k][parts[-1]])
    return parts[::-1]


def pipeline_cut(cfg: MegabyteConfig, method: str, stages: int) -> PipelineCut:
    """The stages balanced by `method` (a key of WEIGHTS; "flops" is FLOPs per byte)."""
    if method not in WEIGHTS:
        raise ValueError(f"partition method {method!r} is not one of {', '.join(WEIGHTS)}")
    found = pieces(cfg)
    bounds = min_max_cut([WEIGHTS[method](p) for p in found], stages)
    starts = [found[b] for b in bounds[1:-1]]
    return PipelineCut(parts=(0, *(p.layer for p in starts), found[-1].layer + 1),
                       inside=tuple(s for s, p in enumerate(starts, 1) if p.branch == SECOND_BRANCH))


def stage_loads(cfg: MegabyteConfig, cut: PipelineCut, method: str = "flops") -> list[float]:
    """What each stage of `cut` costs by `method`."""
    return [sum(WEIGHTS[method](p) for p in stage) for stage in cut.stage_pieces(cfg)]
