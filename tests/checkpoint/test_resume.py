"""Resuming `launch/pretrain.py` runs: exactly, after kill -9 or a signal, at another
data-parallel size, and refusing what cannot resume (real multi-process runs, CPU, fp32).

Every run trains tiny.yaml on a global batch of 4 sequences, so the 1-rank straight run
is the reference for all layouts without dropout (as in tests/train).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatrain.checkpoint import CheckpointError, consolidate, convert, is_universal, partial_tag, read_client_state
from megatrain.config import config_to_dict, load_config
from megatrain.parallel.tensor_parallel import BLOCK_SPLITS
from megatrain.train.checkpointing import check_resumable
from megatrain.train.signals import EXIT_STOPPED

from ..distributed import PRETRAIN, free_port, running_ranks, start_launcher, start_ranks, wait_ranks
from ..train.test_pretrain import TINY, Run, batch, pretrain, relative_gaps

STEPS = 12
PP2_TP2 = ["--pp", "2", "--tp", "2", *batch(2, 2), "--set", "model.dropout=0.1"]  # dropout: RNG state matters


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def copy_at(ckpt: Path, step: int, out: Path) -> Path:
    """A copy of a --save directory whose latest checkpoint is global_step{step}."""
    shutil.copytree(ckpt, out)
    (out / "latest").write_text(f"global_step{step}")
    return out


@pytest.fixture(scope="module")
def straight(tiny_shards, cpu_comm, tmp_path_factory) -> Run:
    """1 rank, STEPS steps, a checkpoint every 2 of which the newest 3 are kept."""
    out = tmp_path_factory.mktemp("straight")
    return pretrain("straight", "python", 1, ["--train-steps", str(STEPS), "--save-interval", "2",
                                             "--keep-last", "3"], tiny_shards, out)


def test_keep_last_keeps_the_newest_complete_checkpoints(straight):
    ckpt = straight.dir / "ckpt"
    assert sorted(p.name for p in ckpt.glob("global_step*")) == ["global_step10", "global_step12", "global_step8"]
    assert (ckpt / "latest").read_text() == "global_step12" and not list(ckpt.glob(".partial-*"))


def test_one_rank_resumes_bitwise(straight, tiny_shards, tmp_path):
    ckpt = copy_at(straight.dir / "ckpt", 8, tmp_path / "ckpt")
    resumed = pretrain("resumed", "python", 1, ["--train-steps", str(STEPS), "--load", str(ckpt)],
                       tiny_shards, tmp_path / "run")
    expected = losses(straight.dir)
    assert losses(resumed.dir) == {s: expected[s] for s in range(9, STEPS + 1)}


def test_bf16_resumes_bitwise(tiny_shards, cpu_comm, tmp_path):
    """bf16 weights, fp32 master weights and gradient accumulation: all of it is restored."""
    bf16 = ["--set", "train.precision=bf16", "--train-steps", "4"]
    first = pretrain("bf16", "python", 1, [*bf16, "--save-interval", "2"], tiny_shards, tmp_path / "straight")
    resumed = pretrain("bf16 resumed", "python", 1, [*bf16, "--load", str(copy_at(first.dir / "ckpt", 2, tmp_path / "c"))],
                       tiny_shards, tmp_path / "resumed")
    expected = losses(first.dir)
    assert losses(resumed.dir) == {s: expected[s] for s in (3, 4)}


def replicas_that_differ(tag: Path) -> list[str]:
    """The replicated weights (all but the tensor-parallel shards) that are not bitwise equal
    on every tensor-parallel rank of a checkpoint."""
    differ = []
    for first in sorted(tag.glob("layer_*-model_00-model_states.pt")):
        ours = torch.load(first, weights_only=True)
        for peer in sorted(tag.glob(first.name.replace("model_00", "model_*")))[1:]:
            theirs = torch.load(peer, weights_only=True)
            differ += [f"{peer.name}: {name}" for name, w in ours.items()
                       if name not in BLOCK_SPLITS and not torch.equal(w, theirs[name])]
    return differ


def test_pp2_tp2_resumes_bitwise(tiny_shards, cpu_comm, tmp_path):
    first = pretrain("pp2tp2", "slurm-env", 4, [*PP2_TP2, "--train-steps", "6", "--save-interval", "3"],
                     tiny_shards, tmp_path / "straight")
    # with dropout, rank 0 measuring the matmul peak must not put its masks out of step with its peers'
    assert replicas_that_differ(first.dir / "ckpt" / "global_step6") == []
    resumed = pretrain("pp2tp2 resumed", "slurm-env", 4,
                       [*PP2_TP2, "--train-steps", "6", "--load", str(copy_at(first.dir / "ckpt", 3, tmp_path / "c"))],
                       tiny_shards, tmp_path / "resumed")
    expected = losses(first.dir)
    assert losses(resumed.dir) == {s: expected[s] for s in (4, 5, 6)}


def wait_for_step(metrics: Path, step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


def run_args(shards: Path, out: Path, *options: str) -> list[str]:
    return ["--config", str(TINY), "--data", str(shards), "--train-steps", str(STEPS),
            "--metrics", str(out / "metrics.jsonl"), "--save", str(out / "ckpt"), *options]


# --- kill -9 of every rank of a pp=2 x dp=2 run, at seeded points ---

PP2_DP2 = ["--pp", "2", *batch(1, 2)]
KILL_STEPS = 8


@pytest.fixture(scope="module")
def straight_pp2_dp2(tiny_shards, cpu_comm, tmp_path_factory) -> dict[int, float]:
    """The losses of the pp=2 x dp=2 run that no one kills."""
    out = tmp_path_factory.mktemp("straight_pp2dp2")
    return losses(pretrain("pp2dp2", "slurm-env", 4, [*PP2_DP2, "--train-steps", str(KILL_STEPS)], tiny_shards, out).dir)


def kill_all(procs: list[subprocess.Popen]) -> None:
    assert all(p.poll() is None for p in procs), "a rank ended before the kill"
    for p in procs:
        p.kill()


def kill_in_a_save(ckpt: Path, first: int, procs: list[subprocess.Popen]) -> int:
    """SIGKILL every rank while the save of step `first` (or, if that one is missed, of a
    later step) is being written: its partial tag directory exists, `latest` does not name
    it yet. The step whose save was cut."""
    deadline = time.monotonic() + 120
    for step in range(first, KILL_STEPS + 1):
        while not (ckpt / partial_tag(step)).is_dir():
            latest = ckpt / "latest"
            if latest.exists() and int(latest.read_text().removeprefix("global_step")) >= step:
                break  # committed between two looks: cut the next one
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no save seen"
            time.sleep(0.001)
        else:
            kill_all(procs)
            return step
    raise AssertionError(f"every save in {ckpt} from step {first} on was missed")


def saved_step(ckpt: Path) -> int:
    latest = ckpt / "latest"
    return int(latest.read_text().removeprefix("global_step")) if latest.exists() else 0


# (how, seed): each seed draws its kill's step (and time after it) in the part of the run left
KILLS = [("in a save", 0), ("at a random time", 1)]


def test_kill_9_of_every_rank_then_resume_gives_the_straight_losses(straight_pp2_dp2, tiny_shards, tmp_path):
    """pp=2 x dp=2, a checkpoint every step, killed (every rank, SIGKILL) and resumed twice,
    at points that seeded generators draw: once while a real save is being written, once at
    a random time; then resumed to the end. Every step any of the runs took has
    the straight run's loss, bit for bit."""
    ckpt = tmp_path / "ckpt"
    for segment, (how, seed) in enumerate(KILLS):
        rng, out, start = random.Random(seed), tmp_path / f"segment{segment}", saved_step(ckpt)
        out.mkdir()
        load = ["--load", str(ckpt)] if start else []
        args = [*run_args(tiny_shards, out, *PP2_DP2, "--save-interval", "1", *load), "--train-steps", str(KILL_STEPS),
                "--save", str(ckpt)]
        with running_ranks("torchrun-env", 4, args, out) as procs:
            step = rng.randint(start + 1, start + 2)
            wait_for_step(out / "metrics.jsonl", step - start, procs, timeout=300)  # 4 ranks starting
            if how == "in a save":
                cut = kill_in_a_save(ckpt, step, procs)
            else:
                time.sleep(rng.uniform(0, 0.3))
                kill_all(procs)
        if how == "in a save":  # a real save, cut half-way: never the latest
            assert (ckpt / partial_tag(cut)).is_dir() and saved_step(ckpt) < cut
        ran = losses(out)
        assert ran == {s: straight_pp2_dp2[s] for s in range(start + 1, start + 1 + len(ran))}, (how, seed)
    start = saved_step(ckpt)
    resumed = pretrain("after kills", "slurm-env", 4, [*PP2_DP2, "--train-steps", str(KILL_STEPS), "--load", str(ckpt),
                                                       "--save", str(ckpt)], tiny_shards, tmp_path / "resumed")
    assert losses(resumed.dir) == {s: straight_pp2_dp2[s] for s in range(start + 1, KILL_STEPS + 1)}
    assert not list(ckpt.glob(".partial-*"))  # cleared by the resumed run


@pytest.fixture(scope="module")
def stopped_dp2(tiny_shards, cpu_comm, tmp_path_factory) -> tuple[Path, int, list[int]]:
    """dp=2 run sent SIGUSR1 on rank 0 only after step 2: its directory, the step both ranks
    stopped at, and their exit codes."""
    out = tmp_path_factory.mktemp("signal")
    with running_ranks("torchrun-env", 2, run_args(tiny_shards, out, *batch(2, 1)), out) as procs:
        wait_for_step(out / "metrics.jsonl", 2, procs)
        procs[0].send_signal(signal.SIGUSR1)
        job = wait_ranks(procs, out, timeout=120)
    return out, max(losses(out)), job.rank_codes


def test_sigusr1_saves_at_the_step_all_ranks_stop(stopped_dp2):
    out, step, codes = stopped_dp2
    assert codes == [EXIT_STOPPED, EXIT_STOPPED]
    assert 2 <= step < STEPS
    assert (out / "ckpt" / "latest").read_text() == f"global_step{step}"


def test_sigterm_to_the_deepspeed_launcher_stops_its_ranks_with_a_checkpoint(tiny_shards, cpu_comm, tmp_path):
    """Pre-emption as a scheduler does it: SIGTERM to every process of a real `deepspeed`
    launch of dp=2 (the runner, DeepSpeed's launch.py, the ranks). On one node the runner
    itself forwards nothing: SIGTERM to it alone leaves the ranks training to the end."""
    proc = start_launcher("deepspeed", 2, [str(PRETRAIN), *run_args(tiny_shards, tmp_path, *batch(2, 1))],
                          free_port())
    try:
        wait_for_step(tmp_path / "metrics.jsonl", 2, [proc])
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    step = max(losses(tmp_path))
    assert 2 <= step < STEPS, output[-4000:]
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{step}", output[-4000:]


FIXED_GLOBAL_BATCH = ["--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=4"]


@pytest.mark.parametrize("launcher,ranks,options", [
    ("torchrun-env", 2, batch(2, 1)), ("python", 1, batch(4, 1)), ("deepspeed", 4, batch(1, 1)),
    ("python", 1, FIXED_GLOBAL_BATCH),  # 2 micro-batches a step, derived
], ids=["dp=2", "dp=1", "dp=4", "dp=1 global_batch_size"])
def test_resume_at_any_data_parallel_size_continues_the_run(stopped_dp2, straight, tiny_shards, tmp_path,
                                                            launcher, ranks, options):
    out, step, _ = stopped_dp2
    ckpt = shutil.copytree(out / "ckpt", tmp_path / "ckpt")
    resumed = pretrain("resumed", launcher, ranks, ["--train-steps", str(STEPS), "--load", str(ckpt), *options],
                       tiny_shards, tmp_path / "run")
    expected = losses(straight.dir)
    got = losses(resumed.dir)
    assert sorted(got) == list(range(step + 1, STEPS + 1))
    assert max(relative_gaps([expected[s] for s in got], list(got.values()))) < 1e-4


# --- another pp x tp layout ---

def close_to(expected: dict[int, float], got: dict[int, float], steps: range) -> bool:
    return sorted(got) == list(steps) and max(relative_gaps([expected[s] for s in steps], [got[s] for s in steps])) < 1e-5


def test_pp2_tp2_checkpoint_converts_and_resumes_on_one_rank(straight, tiny_shards, tmp_path):
    first = pretrain("pp2tp2", "slurm-env", 4, ["--pp", "2", "--tp", "2", *batch(2, 2), "--train-steps", str(STEPS),
                                                "--save-interval", "4"], tiny_shards, tmp_path / "pp2tp2")
    expected = losses(straight.dir)
    assert close_to(expected, losses(first.dir), range(1, STEPS + 1))
    converted = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "megatrain.checkpoint", "convert",
                             str(copy_at(first.dir / "ckpt", 4, tmp_path / "at4")), str(converted)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (converted / "latest").read_text() == "global_step4" and is_universal(converted / "global_step4")
    original, layout_free = consolidate(tmp_path / "at4")[1], consolidate(converted)[1]
    assert all(torch.equal(original[name], layout_free[name]) for name in original)
    resumed = pretrain("resumed on 1 rank", "python", 1, ["--train-steps", str(STEPS), "--load", str(converted)],
                       tiny_shards, tmp_path / "resumed")
    assert close_to(expected, losses(resumed.dir), range(5, STEPS + 1))


def test_one_rank_checkpoint_resumes_at_pp2_tp2(straight, tiny_shards, tmp_path):
    """Read straight from DeepSpeed's files of the other layout, no convert."""
    ckpt = copy_at(straight.dir / "ckpt", 8, tmp_path / "ckpt")
    resumed = pretrain("resumed at pp2 tp2", "slurm-env", 4, ["--pp", "2", "--tp", "2", *batch(2, 2), "--train-steps",
                                                              str(STEPS), "--load", str(ckpt)], tiny_shards, tmp_path)
    assert close_to(losses(straight.dir), losses(resumed.dir), range(9, STEPS + 1))


def test_a_checkpoint_resumes_under_other_stage_boundaries(straight, tiny_shards, tmp_path):
    """pp=2 cut by parameters ((0, 2, 7) inside global block 2: its attention branch on
    stage 0, its MLP branch on stage 1) resumes at its own boundaries bitwise (DeepSpeed's
    files, each branch in a file of its own), cut by flops ((0, 5, 7): whole layers, inside
    the local model, the Head's copy of the embedding made from the saved embedding), and
    back again; its consolidated weights and convert's layout-free form are the same."""
    pp2 = ["--pp", "2", *batch(2, 2), "--save-interval", "2"]
    by_parameters = ["--set", "parallel.partition_method=parameters"]
    old = pretrain("pp2 parameters", "slurm-env", 2, [*pp2, *by_parameters, "--train-steps", "4"], tiny_shards,
                   tmp_path / "old")
    assert {k: read_client_state(old.dir / "ckpt" / "global_step4")["layout"][k] for k in ("parts", "inside")} == \
        {"parts": [0, 2, 7], "inside": [1]}
    same = pretrain("pp2 parameters resumed", "slurm-env", 2,
                    [*pp2, *by_parameters, "--train-steps", "4", "--load", str(copy_at(old.dir / "ckpt", 2, tmp_path / "c"))],
                    tiny_shards, tmp_path / "same")
    assert losses(same.dir) == {s: losses(old.dir)[s] for s in (3, 4)}
    new = pretrain("pp2 flops", "slurm-env", 2, [*pp2, "--train-steps", "6", "--load", str(old.dir / "ckpt")],
                   tiny_shards, tmp_path / "new")
    back = pretrain("pp2 parameters again", "slurm-env", 2,
                    [*pp2, *by_parameters, "--train-steps", "8", "--load", str(new.dir / "ckpt")], tiny_shards,
                    tmp_path / "back")
    assert read_client_state(new.dir / "ckpt" / "global_step6")["layout"]["parts"] == [0, 5, 7]
    expected = losses(straight.dir)
    for run, steps in ((old, range(1, 5)), (new, range(5, 7)), (back, range(7, 9))):
        assert close_to(expected, losses(run.dir), steps)
    original, layout_free = consolidate(old.dir / "ckpt")[1], consolidate(convert(old.dir / "ckpt", tmp_path / "free"))[1]
    assert sorted(original) == sorted(consolidate(straight.dir / "ckpt")[1])
    assert all(torch.equal(original[name], layout_free[name]) for name in original)


def test_convert_refuses_what_it_cannot_write(straight, tmp_path):
    (tmp_path / "full" / "something").mkdir(parents=True)
    for ckpt, out, error in [(straight.dir / "ckpt", tmp_path / "full", "not empty"),
                             (tmp_path / "missing", tmp_path / "out", "no such checkpoint directory")]:
        result = subprocess.run([sys.executable, "-m", "megatrain.checkpoint", "convert", str(ckpt), str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 2 and error in result.stderr and str(ckpt if "such" in error else out) in result.stderr
    assert list((tmp_path / "full").iterdir()) == [tmp_path / "full" / "something"]


def test_second_signal_exits_at_once(tmp_path):
    """...but not the same request delivered twice at once (Slurm's scancel --full)."""
    code = ("import os, signal, time; from megatrain.train.signals import REPEAT_S, StopRequest; s = StopRequest(); "
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR1); "
            "assert s.signal == signal.SIGTERM; time.sleep(REPEAT_S + 0.5); "
            "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(5)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr


# --- bad input: refused before training, naming the mismatch ---

def test_bad_load_is_refused_before_training(straight, tiny_shards, tmp_path):
    ckpt = straight.dir / "ckpt"
    model = config_to_dict(load_config(TINY))["model"]
    fingerprint = json.loads((tiny_shards / "manifest.json").read_text())["fingerprint"]
    assert check_resumable(str(ckpt), model, fingerprint, False).name == "global_step12"
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(CheckpointError, match=str(path)):
            check_resumable(str(path), model, fingerprint, False)
    with pytest.raises(CheckpointError, match="another model shape .local_layers: 2 in the checkpoint, 3 now"):
        check_resumable(str(ckpt), {**model, "local_layers": 3}, fingerprint, False)
    with pytest.raises(CheckpointError, match=f"trained on dataset '{fingerprint}', --data is dataset 'other'"):
        check_resumable(str(ckpt), model, "other", False)
    check_resumable(str(ckpt), model, "other", True)


def test_other_dataset_fails_the_run_before_training(straight, tiny_shards, tmp_path):
    other = tmp_path / "shards"
    some_of_the_same_files = Path(json.__file__).parent
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", str(some_of_the_same_files), "--output", str(other)],
                   check=True, capture_output=True)
    procs = start_ranks("torchrun-env", 1, run_args(other, tmp_path, "--load", str(straight.dir / "ckpt")), tmp_path)
    job = wait_ranks(procs, tmp_path, timeout=120)
    assert job.returncode == 2 and "--allow-data-change" in job.output
    assert not (tmp_path / "metrics.jsonl").exists()
