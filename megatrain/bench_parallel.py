"""The "parallel" figure of `megatrain.bench`: where a layout cuts the model and how fast it steps.

For each layout ("1", "pp2", "tp2", "dp2", "pp2xtp2", ...) it prints one "stage" line per
pipeline stage, from `megatrain.parallel.cost` (its layers, its share of the FLOPs,
its parameters and the activations it keeps per sequence of a micro-batch, both on one
of its ranks, where blocks recomputed under train.activation_checkpointing keep their inputs
and one of them its whole activations again in the backward pass; "activation_peak_mib"
those of the micro-batches in flight at once in the 1F1B schedule), then a "parallel" line:
the stage FLOPs balance (max / mean) and the step time measured by running
`launch/pretrain.py` on that many ranks of this machine (random-free: the standard library's
sources as data unless --data), the median of the timed steps, and the speed-up over the
first layout.

On a CPU each rank gets one thread (`OMP_NUM_THREADS=1`), so that a layout of n ranks
has n times the cores of one rank, as n GPUs would. Compare layouts at one global
batch (`--set train.global_batch_size=N`): a layout's batch is otherwise
micro x accumulation x dp.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable

import torch

from megatrain.config import RunConfig
from megatrain.model import MegabyteConfig, StageBlock, layer_specs
from megatrain.parallel import (Piece, first_local_layer, pieces, pipeline_cut, recomputed_activations,
                                recomputed_blocks)
from megatrain.parallel.pipeline import tensor_parallel_layers
from megatrain.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_VALUE = 4  # fp32 weights and activations; bf16 halves the activations

Emit = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ParallelLayout:
    pp: int = 1
    tp: int = 1
    dp: int = 1

    @property
    def ranks(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def name(self) -> str:
        return "x".join(f"{k}{v}" for k, v in vars(self).items() if v > 1) or "1"

    @classmethod
    def parse(cls, text: str) -> "ParallelLayout":
        """"1", or pp / tp / dp sizes joined by "x": "pp2", "pp2xtp2", "tp2xdp2"."""
        if text == "1":
            return cls()
        parts = text.split("x")
        found = [re.fullmatch(r"(pp|tp|dp)([1-9][0-9]*)", p) for p in parts]
        if not all(found) or len({m[1] for m in found}) != len(found):
            raise ValueError(f"layout {text!r}: write 1, or pp/tp/dp sizes joined by x (e.g. pp2xtp2)")
        return cls(**{m[1]: int(m[2]) for m in found})


def describe_pieces(cfg: MegabyteConfig, stage: list[Piece]) -> str:
    """A stage's layers in words, runs of whole blocks counted: "GlobalEmbedding, 2 global
    blocks, StageInput, 1 local block, local block attention (layer 5)"."""
    sharded, specs = set(tensor_parallel_layers(cfg)), layer_specs(cfg)
    kinds = []
    for layer, group in groupby(stage, key=lambda p: p.layer):
        branches = [p.branch for p in group]
        kind = ("global block" if layer in sharded else "local block") if specs[layer][0] is StageBlock \
            else specs[layer][0].__name__
        whole = branches == [None] or len(branches) == len(StageBlock.BRANCHES)
        kinds.append(kind if whole else f"{kind} {branches[0]} (layer {layer})")
    runs = [(kind, len(list(group))) for kind, group in groupby(kinds)]
    return ", ".join(f"{n} {kind}s" if n > 1 else (f"1 {kind}" if kind.endswith("block") else kind) for kind, n in runs)


def stage_lines(run: RunConfig, layout: ParallelLayout) -> list[dict[str, Any]]:
    """What each pipeline stage of `layout` holds and costs, on one of its ranks: the global
    blocks' parameters split over tp, the local model's activations too (each tp rank runs it
    on its share of the patches); the global blocks' activations are counted whole (an upper
    bound at tp > 1: their norms' inputs are replicated, the rest is split)."""
    cfg = run.model
    cut = pipeline_cut(cfg, run.parallel.partition_method, layout.pp)
    sharded, local = set(tensor_parallel_layers(cfg)), first_local_layer(cfg)
    total = sum(p.cost.flops_per_byte for p in pieces(cfg))
    micro = run.train.micro_batch_size
    lines = []
    for stage, held in enumerate(cut.stage_pieces(cfg)):
        params = sum(p.cost.params / (layout.tp if p.layer in sharded else 1) for p in held)
        layers = cut.layers(stage)
        recomputed = recomputed_blocks(cfg, layers, run.train.checkpoint_blocks) \
            if run.train.activation_checkpointing else []
        share = {i: 1 / layout.tp if i >= local else 1 for i in layers}
        full = {i: sum(p.cost.activations for p in held if p.layer == i) * share[i] for i in layers}
        kept = sum(recomputed_activations(cfg, i) * share[i] if i in recomputed else full[i] for i in layers)
        # a recomputed block's activations exist again while its backward runs, one block at a time
        again = max((full[i] for i in recomputed), default=0)
        # 1F1B: this stage runs the forward of up to pp - stage micro-batches before their backward
        in_flight = min(layout.pp - stage, run.train.accumulation_steps(layout.dp))
        lines.append({"layout": layout.name, "stage": stage, "layers": f"{layers.start}-{layers.stop - 1}",
                      "holds": describe_pieces(cfg, held),
                      "flops_share": sum(p.cost.flops_per_byte for p in held) / total,
                      "params_m": params / 1e6, "param_mib": params * BYTES_PER_VALUE / 2**20,
                      "recomputed_blocks": len(recomputed),
                      "activation_mib": (kept + again) * micro * BYTES_PER_VALUE / 2**20,
                      "micro_batches_in_flight": in_flight,
                      "activation_peak_mib": (kept * in_flight + again) * micro * BYTES_PER_VALUE / 2**20})
    return lines


def measure_step_s(config: str, overrides: tuple[str, ...], layout: ParallelLayout, data: str, steps: int,
                   warmup: int, timeout_s: float = 3600) -> float:
    """The median step time of `launch/pretrain.py` over `steps` steps after `warmup`, run on
    layout.ranks processes of this machine (the variables torchrun would set)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        args = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", config, "--data", data,
                "--pp", str(layout.pp), "--tp", str(layout.tp), "--train-steps", str(warmup + steps),
                "--metrics", str(metrics), *(a for o in overrides for a in ("--set", o))]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(layout.ranks), "LOCAL_WORLD_SIZE": str(layout.ranks)}
        if not torch.cuda.is_available():
            env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        logs = [Path(tmp) / f"rank{r}.log" for r in range(layout.ranks)]
        procs = []
        for rank, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(args, cwd=REPO, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                              stdout=out, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=timeout_s) for p in procs]
        if any(codes):
            failed = codes.index(next(c for c in codes if c))
            raise RuntimeError(f"layout {layout.name}: rank {failed} exited {codes[failed]}:\n"
                               f"{logs[failed].read_text()[-3000:]}")
        times = [json.loads(line)["step_s"] for line in metrics.read_text().splitlines()][warmup:]
        return statistics.median(times)


def parallel_figure(config: str, run: RunConfig, overrides: tuple[str, ...], layouts: list[ParallelLayout],
                    data: str, steps: int, warmup: int, emit: Emit) -> list[dict[str, Any]]:
    """Each layout's stage lines and its measured "parallel" line, as they are known."""
    rows, base = [], None
    for layout in layouts:
        stages = stage_lines(run, layout)
        for line in stages:
            emit("stage", line)
        step_s = measure_step_s(config, overrides, layout, data, steps, warmup)
        base = base or step_s
        shares = [s["flops_share"] for s in stages]
        rows.append({"layout": layout.name, "ranks": layout.ranks,
                     "max_over_mean_stage_flops": max(shares) / (sum(shares) / len(shares)),
                     "step_s": step_s, "speedup": base / step_s})
        emit("parallel", rows[-1])
    return rows
