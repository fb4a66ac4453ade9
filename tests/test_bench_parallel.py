"""The stages' memory estimate of `bench --figures parallel / stages` (megatrain.bench_parallel):
the optimizer state against what DeepSpeed allocates, the per-stage recomputation counts, and the
fewest recomputed blocks that fit a device."""

from __future__ import annotations

import gc
import json
import subprocess

import pytest
import torch

from megatrain.bench_parallel import ParallelLayout, stage_lines
from megatrain.config import load_config

from .distributed import REPO, run_ranks
from .test_bench import BENCH, TINY

DEEPSPEED_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size, in values
WIDE = ["model.global_dim=512", "model.local_dim=256", "model.global_heads=4", "model.local_heads=4",
        "train.micro_batch_size=2"]  # 8M parameters: the optimizer's tensors dwarf the rest


def live_tensor_bytes() -> int:
    """The bytes of every tensor storage this process holds (the parameters' gradients included)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            for t in (obj, obj.grad) if isinstance(obj, torch.nn.Parameter) else (obj,):
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def optimizer_bytes(rank: int, size: int, precision: str) -> tuple[float, list[float]]:
    """A stage's parameters, and the tensor bytes it holds as its gradients are reduced and as its
    optimizer steps (the second step: Adam's moments exist), at dp = size."""
    import deepspeed
    from deepspeed.runtime.pipe.schedule import OptimizerStep, ReduceGrads

    from megatrain.parallel import MegabytePipeline, plan_layout
    from megatrain.train.ds_config import deepspeed_config
    from megatrain.train.optim import build_optimizer, lr_schedule

    deepspeed.init_distributed("gloo", verbose=False)
    cfg = load_config(TINY, [f"train.precision={precision}", *WIDE])
    layout = plan_layout(cfg, size)
    model = MegabytePipeline(cfg.model, layout, 0)
    params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train),
                                      lr_scheduler=lr_schedule(cfg.train, 10), config=deepspeed_config(cfg, layout))
    held: list[float] = []

    def measuring(instruction):
        run = engine._INSTRUCTION_MAP[instruction]

        def measured(engine, **kwargs):
            gc.collect()
            held.append(live_tensor_bytes())
            run(engine, **kwargs)
        return measured

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, **{i: measuring(i) for i in (ReduceGrads, OptimizerStep)}}
    x = torch.randint(0, 256, (2, cfg.model.seq_len))
    batches = iter([(x, x)] * 2)
    engine.train_batch(batches)
    engine.train_batch(batches)
    return params, held[-2:]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_optimizer_state_estimate_is_what_deepspeed_allocates(precision, cpu_comm):
    """ZeRO-1 at dp=2: bf16 holds 8 + 12/2 bytes a parameter (its bf16 weight and gradient, the fp32
    accumulated gradient; the master weight and moments halved); fp32 the weight and gradient
    whole, the optimizer state halved and one 500M-value reduction bucket of DeepSpeed's."""
    (params, held), _ = run_ranks(optimizer_bytes, 2, precision, timeout=300)
    stage, = stage_lines(load_config(TINY, [f"train.precision={precision}", *WIDE]), ParallelLayout(dp=2))
    estimate, counted = stage["state_mib"] * 2**20, stage["params_m"] * 1e6
    assert params < counted < params * 1.01  # the cost model counts the tied byte embedding twice
    if precision == "bf16":
        assert held[0] == held[1]  # nothing comes or goes while the gradients are reduced
        assert estimate == pytest.approx(counted * 14)
    else:
        assert estimate == pytest.approx(counted * 16 + DEEPSPEED_BUCKET * 4)  # the reduced gradient's half beside the whole
    # the rest of the process's tensors (the batch, the pipeline's buffers, the norms' statistics) are small
    assert max(held) <= estimate < max(held) * 1.03


def memory_by_count(overrides: list[str], layout: ParallelLayout, counts: int) -> list[list[float]]:
    """Each stage's estimated memory recomputing n blocks per stage, for n in 0..counts."""
    rows = []
    for n in range(counts + 1):
        run = load_config(TINY, [*overrides, f"train.checkpoint_blocks={n}"])
        rows.append([s["memory_mib"] for s in stage_lines(run, layout)])
    return [list(stage) for stage in zip(*rows)]


def test_each_stage_fits_with_the_fewest_blocks_recomputed():
    """bf16 at pp=2 x dp=2 with 4 micro-batches a step (2 in flight on stage 0): a stage's memory is
    its optimizer state (8 + 12/dp bytes a parameter) and its activations in flight (2 bytes a value),
    a list gives each stage its count, and --memory-gib G the fewest blocks that fit in G."""
    layout = ParallelLayout(pp=2, dp=2)
    overrides = ["train.precision=bf16", "train.activation_checkpointing=true", "train.grad_accum_steps=4"]
    counted = stage_lines(load_config(TINY, [*overrides, "train.checkpoint_blocks=[2, 0]"]), layout)
    assert [s["recomputed_blocks"] for s in counted] == [2, 0]
    assert [s["micro_batches_in_flight"] for s in counted] == [2, 1]
    for s in counted:
        assert s["state_mib"] * 2**20 == pytest.approx(s["params_m"] * 1e6 * (8 + 12 / 2))
        assert s["memory_mib"] == s["state_mib"] + s["activation_peak_mib"]
    fp32 = stage_lines(load_config(TINY, [*overrides, "train.checkpoint_blocks=[2, 0]", "train.precision=fp32"]),
                       layout)
    assert [s["activation_peak_mib"] for s in fp32] == [2 * s["activation_peak_mib"] for s in counted]
    memory = memory_by_count(overrides, layout, 3)  # stage 0 holds 3 blocks, stage 1 one
    assert memory[0][2] < memory[0][0] and memory[0][3] < memory[0][2]  # recomputing pays there
    for budget_mib in sorted({m for stage in memory for m in stage}):
        lines = stage_lines(load_config(TINY, overrides), layout, memory_gib=budget_mib / 1024)
        for stage, line in enumerate(lines):
            fitting = [n for n, m in enumerate(memory[stage]) if m <= budget_mib]
            assert line["fewest_recomputed_blocks"] == min(fitting, default=None), (budget_mib, stage)
    assert all(s["fewest_recomputed_blocks"] is None for s in stage_lines(load_config(TINY, overrides), layout,
                                                                           memory_gib=1e-4))


def test_the_stages_figure_gives_the_counts_that_fit_without_running_anything():
    """`--figures stages --memory-gib G`: the stage lines and each layout's checkpoint_blocks list."""
    overrides = ["train.precision=bf16", "train.activation_checkpointing=true", "train.grad_accum_steps=4"]
    layout = ParallelLayout(pp=2)
    lines = stage_lines(load_config(TINY, overrides), layout)
    budget_gib = (lines[0]["memory_mib"] + 1e-3) / 1024  # every block of stage 0 recomputed fits
    result = subprocess.run([*BENCH, "--config", TINY, "--figures", "stages", "--layouts", "1,pp2",
                             "--memory-gib", str(budget_gib), *(a for o in overrides for a in ("--set", o))],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["figure"] for line in out] == ["device", "stage", "stages", "stage", "stage", "stages", "report"]
    one, pp2 = (line for line in out if line["figure"] == "stages")
    fewest = [s["fewest_recomputed_blocks"] for s in stage_lines(load_config(TINY, overrides), layout, budget_gib)]
    assert pp2 == {**pp2, "layout": "pp2", "memory_gib": budget_gib, "checkpoint_blocks": fewest,
                   "max_memory_mib": max(s["memory_mib"] for s in lines)}
    assert fewest[0] is not None and one["layout"] == "1"
    bad = subprocess.run([*BENCH, "--config", TINY, "--figures", "stages", "--layouts", "pp2", "--memory-gib", "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "--memory-gib 0.0: give the device's memory in GiB" in bad.stderr
