"""The "parallel" and "stages" figures of `megatrain.bench`: where a layout cuts the model, what
each stage needs in memory and how fast it steps.

For each layout ("1", "pp2", "tp2", "dp2", "pp2xtp2", ...) it prints one "stage" line per
pipeline stage, from `megatrain.parallel.cost`, all on one of the stage's ranks: its layers, its
share of the FLOPs, its parameters and their weights, gradients and Adam state
("state_mib"), the activations it keeps per micro-batch ("activation_mib"; bf16 2 bytes a
value, fp32 4), where blocks recomputed under train.activation_checkpointing keep their
inputs and one of them its whole activations again in the backward pass;
"activation_peak_mib" those of the micro-batches in flight at once in the 1F1B schedule, and
"memory_mib" the two together. With --memory-gib G (a rank's device memory) each stage line
also gives the fewest blocks the stage must recompute to fit in 90% of G (what
train.checkpoint_blocks: auto chooses on such a device).

"stages" stops there, with a "stages" line per layout: its largest stage memory and that
train.checkpoint_blocks list (nothing is run: it takes seconds for any model).
"parallel" adds a "parallel" line:
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
from megatrain.parallel import Layout, Piece, pieces
from megatrain.parallel.pipeline import tensor_parallel_layers
from megatrain.train.distributed import free_port
from megatrain.train.memory import auto_budget_gib, checkpoint_counts, stage_memories

REPO = Path(__file__).resolve().parents[1]
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


def stage_lines(run: RunConfig, layout: ParallelLayout, memory_gib: float | None = None) -> list[dict[str, Any]]:
    """What each pipeline stage of `layout` holds and costs, on one of its ranks
    (`megatrain.train.memory.StageMemory`). With `memory_gib` (a rank's device memory), also the
    fewest blocks the stage must recompute to fit in train.checkpoint_blocks: auto's budget
    (90% of it, or train.checkpoint_memory_gib): None where all are not enough."""
    cfg, train = run.model, run.train
    grid = Layout(layout.pp, layout.tp, layout.dp)
    total = sum(p.cost.flops_per_byte for p in pieces(cfg))
    counts = checkpoint_counts(run, grid, memory_gib) if train.activation_checkpointing else (0,) * layout.pp
    lines = []
    for stage, count in zip(stage_memories(run, grid), counts):
        recomputed, layers = stage.recomputed(count), stage.layers
        line = {"layout": layout.name, "stage": stage.stage, "layers": f"{layers.start}-{layers.stop - 1}",
                "holds": describe_pieces(cfg, stage.pieces),
                "flops_share": sum(p.cost.flops_per_byte for p in stage.pieces) / total,
                "params_m": stage.params / 1e6, "state_mib": stage.state_mib,
                "recomputed_blocks": len(recomputed),
                "activation_mib": stage.activation_mib(recomputed),
                "micro_batches_in_flight": stage.in_flight,
                "activation_peak_mib": stage.activation_peak_mib(recomputed),
                "memory_mib": stage.memory_mib(recomputed)}
        if memory_gib is not None:
            line["fewest_recomputed_blocks"] = stage.fewest_recomputed(auto_budget_gib(run, memory_gib) * 1024)
        lines.append(line)
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


def emit_stage_lines(run: RunConfig, layout: ParallelLayout, memory_gib: float | None,
                     emit: Emit) -> list[dict[str, Any]]:
    stages = stage_lines(run, layout, memory_gib)
    for line in stages:
        emit("stage", line)
    return stages


def stages_figure(run: RunConfig, layouts: list[ParallelLayout], memory_gib: float | None,
                  emit: Emit) -> list[dict[str, Any]]:
    """Each layout's stage lines, estimated only (no run), and a "stages" line per layout: the
    most memory a stage needs, and with `memory_gib` each stage's fewest recomputed blocks,
    the train.checkpoint_blocks list that fits (None where one stage cannot fit)."""
    rows = []
    for layout in layouts:
        stages = emit_stage_lines(run, layout, memory_gib, emit)
        row = {"layout": layout.name, "max_memory_mib": max(s["memory_mib"] for s in stages)}
        if memory_gib is not None:
            fewest = [s["fewest_recomputed_blocks"] for s in stages]
            row.update(memory_gib=memory_gib, checkpoint_blocks=None if None in fewest else fewest)
        rows.append(row)
        emit("stages", row)
    return rows


def parallel_figure(config: str, run: RunConfig, overrides: tuple[str, ...], layouts: list[ParallelLayout],
                    data: str, steps: int, warmup: int, emit: Emit,
                    memory_gib: float | None = None) -> list[dict[str, Any]]:
    """Each layout's stage lines and its measured "parallel" line, as they are known."""
    rows, base = [], None
    for layout in layouts:
        stages = emit_stage_lines(run, layout, memory_gib, emit)
        step_s = measure_step_s(config, overrides, layout, data, steps, warmup)
        base = base or step_s
        shares = [s["flops_share"] for s in stages]
        rows.append({"layout": layout.name, "ranks": layout.ranks,
                     "max_over_mean_stage_flops": max(shares) / (sum(shares) / len(shares)),
                     "step_s": step_s, "speedup": base / step_s})
        emit("parallel", rows[-1])
    return rows
