"""The "parallel" and "stages" figures of `megatrain.bench`: where a layout cuts the model, what
each stage needs in memory and how fast it steps.

For each layout ("1", "pp2", "tp2", "dp2", "pp2xtp2", ...) it prints one "stage" line per
pipeline stage, from `megatrain.parallel.cost`, all on one of the stage's ranks: its layers, its
share of the FLOPs, its parameters and their weights, gradients and Adam state
("state_mib"), the activations it keeps per micro-batch ("activation_mib"; bf16 2 bytes a
value, fp32 4), where blocks recomputed under train.activation_checkpointing keep their
inputs and one of them its whole activations again in the backward pass;
"activation_peak_mib" those of the micro-batches in flight at once in the 1F1B schedule, and
"memory_mib" the two together. With --memory-gib G each stage line also gives the fewest
blocks the stage must recompute to fit in G GiB.

"stages" stops there, with a "stages" line per layout: its largest stage memory and the
train.checkpoint_blocks list that fits in G (nothing is run: it takes seconds for any model).
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
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from megatrain.config import RunConfig
from megatrain.model import MegabyteConfig, StageBlock, layer_specs
from megatrain.parallel import (Layout, Piece, first_local_layer, pieces, pipeline_cut, recomputed_activations,
                                recomputed_blocks)
from megatrain.parallel.pipeline import tensor_parallel_layers
from megatrain.train.distributed import free_port
from megatrain.train.ds_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_ACTIVATION = {"bf16": 2, "fp32": 4}  # by train.precision


def state_mib(run: RunConfig, layout: ParallelLayout, params: float) -> float:
    """The weights, gradients and Adam state of `params` parameters on one rank at their peak, with
    DeepSpeed's optimizers under ZeRO-1: the fp32 master weight and two moments (12 bytes a
    parameter) split over the dp ranks. bf16: the bf16 weight and gradient and the fp32
    accumulated gradient whole on every rank (8 bytes). fp32: the weight and its gradient whole
    (8), the reduced gradient's share (4 / dp) beside them, and one reduction bucket of
    `reduce_bucket_size` fp32 values (DeepSpeed's default: 1.9 GiB). tests/test_bench_parallel.py measures them."""
    if run.train.precision == "bf16":
        return params * (8 + 12 / layout.dp) / 2**20
    zero = DeepSpeedZeroConfig(**deepspeed_config(run, Layout(layout.pp, layout.tp, layout.dp))["zero_optimization"])
    bucket = zero.reduce_bucket_size * 4 if zero.contiguous_gradients else 0
    return (params * (8 + 16 / layout.dp) + bucket) / 2**20


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
    """What each pipeline stage of `layout` holds and costs, on one of its ranks: the global
    blocks' parameters split over tp, the local model's activations too (each tp rank runs it
    on its share of the patches); the global blocks' activations are counted whole (an upper
    bound at tp > 1: their norms' inputs are replicated, the rest is split). With `memory_gib`,
    also the fewest blocks the stage must recompute for its estimated memory to fit in that
    (None where recomputing all of them is not enough)."""
    cfg, train = run.model, run.train
    cut = pipeline_cut(cfg, run.parallel.partition_method, layout.pp)
    sharded, local = set(tensor_parallel_layers(cfg)), first_local_layer(cfg)
    total = sum(p.cost.flops_per_byte for p in pieces(cfg))
    scale = train.micro_batch_size * BYTES_PER_ACTIVATION[train.precision] / 2**20  # elements -> MiB
    lines = []
    for stage, held in enumerate(cut.stage_pieces(cfg)):
        params = sum(p.cost.params / (layout.tp if p.layer in sharded else 1) for p in held)
        state = state_mib(run, layout, params)
        layers = cut.layers(stage)
        share = {i: 1 / layout.tp if i >= local else 1 for i in layers}
        full = {i: sum(p.cost.activations for p in held if p.layer == i) * share[i] for i in layers}
        # 1F1B: this stage runs the forward of up to pp - stage micro-batches before their backward
        in_flight = min(layout.pp - stage, train.accumulation_steps(layout.dp))

        def activations(recomputed: list[int]) -> tuple[float, float]:
            """Elements kept per micro-batch, and those a recomputed block brings back in its backward
            (one block at a time)."""
            kept = sum(recomputed_activations(cfg, i) * share[i] if i in recomputed else full[i] for i in layers)
            return kept, max((full[i] for i in recomputed), default=0)

        def peak_mib(recomputed: list[int]) -> float:
            kept, again = activations(recomputed)
            return (kept * in_flight + again) * scale

        recomputed = recomputed_blocks(cfg, layers, train.checkpoint_blocks_of(stage, layout.pp)) \
            if train.activation_checkpointing else []
        kept, again = activations(recomputed)
        line = {"layout": layout.name, "stage": stage, "layers": f"{layers.start}-{layers.stop - 1}",
                "holds": describe_pieces(cfg, held),
                "flops_share": sum(p.cost.flops_per_byte for p in held) / total,
                "params_m": params / 1e6, "state_mib": state,
                "recomputed_blocks": len(recomputed),
                "activation_mib": (kept + again) * scale,
                "micro_batches_in_flight": in_flight,
                "activation_peak_mib": peak_mib(recomputed),
                "memory_mib": state + peak_mib(recomputed)}
        if memory_gib is not None:
            blocks = len(recomputed_blocks(cfg, layers, None))
            line["fewest_recomputed_blocks"] = next(
                (n for n in range(blocks + 1)
                 if state + peak_mib(recomputed_blocks(cfg, layers, n)) <= memory_gib * 1024), None)
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
