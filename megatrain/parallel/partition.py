"""Pipeline stages as the contiguous cut of the layer list whose costliest stage costs least.

Any layer may start a stage, the local model's included: the local model runs once per
byte, so at MEGABYTE's proportions it is most of the FLOPs (text-1b 70%, 1m 91%) and
a pipeline that kept it whole on one stage could not balance. The cut is exact (a
min-max dynamic program over prefix sums), not DeepSpeed's heuristic `partition_balanced`.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable

from megatrain.model import MegabyteConfig

from .cost import LayerCost, layer_costs

# Bytes a layer keeps on its stage per sequence of a micro-batch of one, fp32 with Adam:
# weights, gradients and two moments per parameter, and the activations kept for backward.
BYTES_PER_PARAM = 16
BYTES_PER_ACTIVATION = 4

WEIGHTS: dict[str, Callable[[LayerCost], float]] = {
    "flops": lambda c: c.flops_per_byte,
    "memory": lambda c: BYTES_PER_PARAM * c.params + BYTES_PER_ACTIVATION * c.activations,
    "parameters": lambda c: c.params,
    "uniform": lambda c: 1,
}


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


def pipeline_parts(cfg: MegabyteConfig, method: str, stages: int) -> list[int]:
    """Stage boundaries over the layers: stage s holds layers parts[s]..parts[s+1]-1,
    balanced by `method` (a key of WEIGHTS; "flops" is FLOPs per byte)."""
    if method not in WEIGHTS:
        raise ValueError(f"partition method {method!r} is not one of {', '.join(WEIGHTS)}")
    return min_max_cut([WEIGHTS[method](c) for c in layer_costs(cfg)], stages)


def stage_loads(cfg: MegabyteConfig, parts: list[int], method: str = "flops") -> list[float]:
    """What each stage of `parts` costs by `method`."""
    weights = [WEIGHTS[method](c) for c in layer_costs(cfg)]
    return [sum(weights[a:b]) for a, b in zip(parts, parts[1:])]
