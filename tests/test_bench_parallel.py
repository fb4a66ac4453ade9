"""`bench --figures stages` (megatrain.bench_parallel): each stage's memory estimate
(megatrain.train.memory, tested in tests/train/test_memory.py) and the counts that fit a device."""

from __future__ import annotations

import json
import subprocess

from megatrain.bench_parallel import ParallelLayout, stage_lines
from megatrain.config import load_config
from megatrain.parallel import Layout
from megatrain.train.memory import AUTO_SHARE, stage_memories

from .distributed import REPO
from .test_bench import BENCH, TINY

RECOMPUTING = ["train.precision=bf16", "train.activation_checkpointing=true", "train.grad_accum_steps=4"]


def stages(*args: str) -> list[dict]:
    result = subprocess.run([*BENCH, "--config", TINY, "--figures", "stages", *args], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_stages_figure_gives_each_stages_memory_and_the_counts_that_fit_without_running_anything():
    """`--figures stages --memory-gib G`: each stage's estimate, and per layout the checkpoint_blocks
    list auto would choose on devices of G GiB (the fewest recomputed blocks in 90% of G)."""
    first = stage_memories(load_config(TINY, RECOMPUTING), Layout(2, 1, 1))[0]
    device_gib = (first.memory_mib(first.recomputed(2)) + 1e-3) / 1024 / AUTO_SHARE
    out = stages("--layouts", "1,pp2", "--memory-gib", str(device_gib), *(a for o in RECOMPUTING for a in ("--set", o)))
    assert [line["figure"] for line in out] == ["device", "stage", "stages", "stage", "stage", "stages", "report"]
    one, pp2 = (line for line in out if line["figure"] == "stages")
    assert one["layout"] == "1" and pp2["layout"] == "pp2" and pp2["memory_gib"] == device_gib
    lines = [line for line in out if line["figure"] == "stage" and line["layout"] == "pp2"]
    assert pp2["checkpoint_blocks"] == [s["fewest_recomputed_blocks"] for s in lines]
    assert pp2["checkpoint_blocks"][0] == first.fewest_recomputed(AUTO_SHARE * device_gib * 1024) == 2
    assert pp2["max_memory_mib"] == max(s["memory_mib"] for s in lines)
    assert lines[0]["memory_mib"] == first.memory_mib(first.recomputed(None))  # the config's: every block
    assert lines[0]["state_mib"] == first.state_mib and lines[0]["micro_batches_in_flight"] == 2


def test_with_auto_the_stage_lines_recompute_what_fits():
    run = load_config(TINY, [*RECOMPUTING, "train.checkpoint_blocks=auto"])
    first = stage_memories(run, Layout(2, 1, 1))[0]
    device_gib = (first.memory_mib(first.recomputed(2)) + 1e-3) / 1024 / AUTO_SHARE
    lines = stage_lines(run, ParallelLayout(pp=2), memory_gib=device_gib)
    assert [s["recomputed_blocks"] for s in lines] == [s["fewest_recomputed_blocks"] for s in lines]
    assert lines[0]["recomputed_blocks"] == 2


def test_a_list_of_counts_serves_the_layouts_it_fits():
    """A list for pp=2 is the stages figure's at pp2 (the train figure alone is one stage)."""
    out = stages("--layouts", "pp2", "--set", "train.activation_checkpointing=true",
                 "--set", "train.checkpoint_blocks=[2, 0]")
    assert [line["recomputed_blocks"] for line in out if line["figure"] == "stage"] == [2, 0]


def test_bad_memory_is_named():
    result = subprocess.run([*BENCH, "--config", TINY, "--figures", "stages", "--layouts", "pp2", "--memory-gib", "0"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "--memory-gib 0.0: give the device's memory in GiB" in result.stderr
    result = subprocess.run([*BENCH, "--config", TINY, "--figures", "stages", "--set", "train.activation_checkpointing=true",
                             "--set", "train.checkpoint_blocks=auto"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 2 and "auto needs the device's memory" in result.stderr
