"""Faults met for real by dp=2 and pp=2 x tp=2 runs: NaNs injected into a parameter or a
loss on one rank, checkpoint files truncated and bit-flipped on disk, a --save directory
on a tiny tmpfs that fills up mid-save. Each ends on every rank alike, with its exit code."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatrain.train.faults import (EXIT_CORRUPT_DATA, EXIT_DAMAGED_CHECKPOINT, EXIT_NON_FINITE, EXIT_SAVE_FAILED,
                                    INJECT_FAULT)

from ..distributed import REPO, launch, tmpfs

TINY = str(REPO / "configs" / "tiny.yaml")


def pretrain(tmp_path: Path, shards: Path, ranks: int, name: str, *options: str):
    """A tiny run on `ranks` rank processes; its job and its metrics by step."""
    log_dir = tmp_path / name
    log_dir.mkdir()
    metrics = log_dir / "metrics.jsonl"
    job = launch("torchrun-env", ranks, ["--config", TINY, "--data", str(shards), "--metrics", str(metrics),
                                         *options], log_dir, timeout=240)
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return job, {record["step"]: record for record in steps}


SPIKES = ("--set", "train.spike_window=2", "--set", "train.spike_sigma=3")  # flags the 50-fold loss


def verify(ckpt: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatrain.checkpoint", "verify", str(ckpt)], cwd=REPO,
                          capture_output=True, text=True)


def test_non_finite_steps_are_skipped_alike_and_damaged_checkpoints_are_refused_or_passed_over(
        tiny_shards, cpu_comm, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    # step 2: one NaN loss on rank 1 (its gradients reach rank 0 by the all-reduce);
    # from step 5: a NaN weight on rank 0, so that every later step is non-finite
    monkeypatch.setenv(INJECT_FAULT, "loss@2@1,param@5@0")
    job, steps = pretrain(tmp_path, tiny_shards, 2, "faulty", "--train-steps", "8", "--save", str(ckpt),
                          "--save-interval", "2", "--set", "train.max_skipped_steps=2")
    monkeypatch.delenv(INJECT_FAULT)
    assert job.rank_codes == [EXIT_NON_FINITE] * 2, job.output[-3000:]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # stopped after 2 skipped steps in a row
    assert steps[2]["skipped"] == "non-finite loss" and steps[2]["skipped_steps"] == 1
    assert steps[3]["lr"] == steps[2]["lr"]  # a skipped step does not advance the schedule
    assert "skipped" not in steps[3] and math.isfinite(steps[4]["loss"])
    assert [steps[s]["skipped_steps"] for s in (4, 5, 6)] == [1, 2, 3]
    assert job.output.count(f"the last good checkpoint is {ckpt / 'global_step4'}") == 2
    assert (ckpt / "latest").read_text() == "global_step4"
    assert verify(ckpt).returncode == 0

    # damage: global_step4 truncated, global_step2 intact; `verify` names the bad file
    zero = ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(zero, zero.stat().st_size // 2)
    result = verify(ckpt)
    assert result.returncode == 1 and f"{zero}: " in result.stdout and "global_step2: ok" in result.stdout

    # --load DIR: falls back to global_step2 and replays steps 3-4 exactly as the faulty run did
    job, resumed = pretrain(tmp_path, tiny_shards, 2, "resumed", "--train-steps", "4", "--load", str(ckpt))
    assert job.returncode == 0, job.output[-3000:]
    assert f"{ckpt / 'global_step4'} is damaged" in job.output and "loading global_step2" in job.output
    assert [resumed[s]["loss"] for s in (3, 4)] == [steps[s]["loss"] for s in (3, 4)]
    assert resumed[4]["skipped_steps"] == 1  # the count is part of the checkpoint

    # --load DIR/global_step2 with one bit flipped: refused, naming the file
    layer = ckpt / "global_step2" / "layer_01-model_00-model_states.pt"
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0x10
    layer.write_bytes(data)
    result = verify(ckpt)
    assert result.returncode == 1 and f"{layer}: checksum differs" in result.stdout
    job, _ = pretrain(tmp_path, tiny_shards, 2, "refused", "--load", str(ckpt / "global_step2"))
    assert job.rank_codes == [EXIT_DAMAGED_CHECKPOINT] * 2
    assert job.output.count(f"{layer}: checksum differs") == 2


def test_a_non_finite_state_is_never_saved_in_a_pipeline_and_tensor_parallel_run(
        tiny_shards, cpu_comm, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv(INJECT_FAULT, "param@3@3")  # last stage, tensor-parallel rank 1
    job, steps = pretrain(tmp_path, tiny_shards, 4, "poisoned", "--pp", "2", "--tp", "2", "--train-steps", "6",
                          "--set", "train.precision=bf16",  # the dp=2 test is fp32: both skip
                          "--save", str(ckpt), "--save-interval", "2", "--keep-last", "1")
    assert job.rank_codes == [EXIT_NON_FINITE] * 4, job.output[-3000:]
    assert [steps[s].get("skipped") is not None for s in (1, 2, 3, 4)] == [False, False, True, True]
    assert job.output.count(f"refusing to save step 4: the weights or optimizer state hold NaN or Inf; "
                            f"the last good checkpoint is {ckpt / 'global_step2'}") == 4
    assert sorted(p.name for p in ckpt.glob("*global_step*")) == ["global_step2"]
    assert (ckpt / "latest").read_text() == "global_step2"


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 3 MB tmpfs: room for one checkpoint of the tiny model (2.3 MB) and not for two."""
    with tmpfs(tmp_path, "3m") as disk:
        yield disk


def test_a_loss_spike_is_skipped_and_a_full_disk_fails_the_save_on_every_rank(tiny_shards, cpu_comm,
                                                                             tmp_path, tiny_disk, monkeypatch):
    ckpt = tiny_disk / "ckpt"
    monkeypatch.setenv(INJECT_FAULT, "spike@3@1")  # rank 1's loss: the data-parallel mean spikes on both
    job, steps = pretrain(tmp_path, tiny_shards, 2, "full", "--train-steps", "6", "--save", str(ckpt),
                          "--save-interval", "2", *SPIKES, "--set", "train.spike_policy=skip")
    assert [s for s in steps if steps[s].get("loss_spike")] == [3]
    assert job.output.count("warning: step 3: loss spike") == 1  # rank 0 says it
    assert steps[3]["skipped"] == "loss spike" and steps[4]["skipped_steps"] == 1
    assert steps[4]["lr"] == steps[3]["lr"] != steps[2]["lr"]  # not applied: the schedule waits
    assert job.rank_codes == [EXIT_SAVE_FAILED] * 2, job.output[-3000:]
    assert sorted(steps) == [1, 2, 3, 4]
    assert job.output.count("No space left on device") >= 2  # every rank says why
    assert job.output.count(f"the last complete checkpoint is {ckpt / 'global_step2'}") == 2
    assert (ckpt / "latest").read_text() == "global_step2"
    assert not list(ckpt.glob(".partial-*")) and verify(ckpt).returncode == 0


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_and_the_data_goes_on(tiny_shards, cpu_comm, tmp_path,
                                                                            monkeypatch):
    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv(INJECT_FAULT, "spike@5@1")  # the last stage's loss; stage 0 learns of it
    rollback = (*SPIKES, "--set", "train.spike_policy=rollback", "--set", "train.precision=bf16")  # dp=2: fp32
    job, _ = pretrain(tmp_path, tiny_shards, 2, "rollback", "--pp", "2", "--train-steps", "7", "--save", str(ckpt),
                      "--save-interval", "2", *rollback)
    monkeypatch.delenv(INJECT_FAULT)
    assert job.rank_codes == [0, 0], job.output[-3000:]
    records = [json.loads(line) for line in (tmp_path / "rollback" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6, 7]
    spike, after = records[4], records[5]
    assert spike["loss_spike"] and spike["skipped"] == "loss spike" and spike["rolled_back_to"] == "global_step4"
    assert job.output.count(f"rolled back to {ckpt / 'global_step4'}") == 1
    assert after["lr"] == spike["lr"] and "skipped" not in after  # step 5 again, from global_step4's state
    # on the next batch: the spiked one at the same weights would give the spike's loss / 50
    assert after["loss"] != pytest.approx(spike["loss"] / 50, rel=1e-3)
    assert after["skipped_steps"] == 1 and (ckpt / "latest").read_text() == "global_step7"
    # the data position saved after the rollback resumes exactly
    job, resumed = pretrain(tmp_path, tiny_shards, 2, "resumed", "--pp", "2", "--train-steps", "7",
                            "--load", str(ckpt / "global_step6"), *rollback)
    assert job.returncode == 0, job.output[-3000:]
    assert resumed[7]["loss"] == records[-1]["loss"]


def test_a_corrupt_shard_stops_every_rank_or_is_skipped_alike(cpu_comm, tmp_path):
    shards = tmp_path / "shards"
    stdlib = Path(json.__file__).parents[1]
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", *map(str, sorted((stdlib / "email").glob("*.py"))),
                    "--output", str(shards), "--shard-bytes", "100000", "--val-fraction", "0.1"],
                   cwd=REPO, check=True, capture_output=True)
    shard = shards / "train-00001.arrow"
    os.truncate(shard, shard.stat().st_size * 3 // 5)  # the manifest is left as it was
    # pipeline stage 1 of 3 reads no data: it stops too, instead of waiting for activations
    job, steps = pretrain(tmp_path, shards, 3, "corrupt", "--pp", "3", "--train-steps", "4",
                          "--set", "data.on_corrupt=error")
    assert job.rank_codes == [EXIT_CORRUPT_DATA] * 3, job.output[-3000:]
    assert job.output.count(f"error: training data: corrupt shard {shard}") == 3 and not steps

    job, steps = pretrain(tmp_path, shards, 2, "skipped", "--train-steps", "4", "--save", str(tmp_path / "ckpt"),
                          "--save-interval", "2", "--set", "data.on_corrupt=skip")
    assert job.returncode == 0, job.output[-3000:]
    assert job.output.count(f"data.on_corrupt skip: the windows that touch corrupt shard {shard}") == 1
    assert [steps[s].get("corrupt_shards") for s in (1, 4)] == [1, 1]  # met by step 1
    job, resumed = pretrain(tmp_path, shards, 2, "resumed", "--train-steps", "4", "--load", str(tmp_path / "ckpt" / "global_step2"),
                            "--set", "data.on_corrupt=skip")
    assert [resumed[s]["loss"] for s in (3, 4)] == [steps[s]["loss"] for s in (3, 4)]
