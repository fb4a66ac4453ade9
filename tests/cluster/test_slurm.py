"""launch/slurm/*.sbatch on a real one-node Slurm cluster (see conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..distributed import REPO

# the first test also starts the cluster (installing its packages on a fresh machine)
pytestmark = pytest.mark.timeout(1800)

SLURM_DIR = REPO / "launch" / "slurm"
TINY = REPO / "configs" / "tiny.yaml"


class Job:
    """`sbatch --wait --parsable ARGS` from the repository root, its output going to `log`."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.env, self.log = env, log
        self.proc = subprocess.Popen(["sbatch", "--wait", "--parsable", f"--output={log}", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.id = self.proc.stdout.readline().strip().split(";")[0]  # printed at submission
        if not self.id:
            pytest.fail(f"sbatch failed: {self.proc.communicate()[1]}")

    @property
    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait(self, timeout: float = 300) -> int:
        """The job's exit code once it has ended (requeues included); cancelled at the deadline."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still ran after {timeout} s")

    def fail(self, why: str) -> None:
        """Cancel the job, so that it does not load the rest of the suite, and fail the test."""
        subprocess.run(["scancel", self.id], env=self.env)
        self.proc.kill()
        pytest.fail(f"job {self.id} {why}:\n{self.output[-6000:]}")


def steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def pretrain(run: Path, shards: Path, train_steps: int, *options: str) -> list[str]:
    """pretrain.sbatch and its pretrain.py options: micro-batches of 2 on each of the 2 tasks."""
    return [str(SLURM_DIR / "pretrain.sbatch"), "--config", str(TINY), "--data", str(shards),
            "--train-steps", str(train_steps), "--save", str(run / "ckpt"), "--metrics", str(run / "metrics.jsonl"),
            "--set", "train.micro_batch_size=2", *options]


def test_a_batch_job_runs_its_tasks(slurm, tmp_path):
    job = Job(slurm, tmp_path / "job.out", "--ntasks=2", "--wrap", "srun hostname")
    assert job.wait() == 0, job.output
    assert len(job.output.split()) == 2


def test_pretrain_sbatch_trains_on_two_tasks_and_checkpoints(slurm, tiny_shards, cpu_comm, tmp_path):
    job = Job(slurm, tmp_path / "job.out", "--ntasks=2", *pretrain(tmp_path, tiny_shards, 6, "--save-interval", "3"))
    assert job.wait() == 0, job.output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["samples"] == 4  # 2 per task: both tasks trained, data-parallel
    assert (tmp_path / "ckpt" / "global_step3").is_dir()
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step6"


def test_preemption_checkpoints_requeues_and_resumes(slurm, tiny_shards, cpu_comm, tmp_path):
    total = 200
    metrics = tmp_path / "metrics.jsonl"
    job = Job(slurm, tmp_path / "job.out", "--ntasks=2", *pretrain(tmp_path, tiny_shards, total))
    deadline = time.monotonic() + 120
    while len(steps(metrics)) < 5:  # well into the run
        if job.proc.poll() is not None or time.monotonic() > deadline:
            job.fail("did not reach step 5")
        time.sleep(0.2)
    # What a pre-emption warning does (--signal=B:USR1@120): USR1 to the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--full", job.id], env=slurm, check=True)
    assert job.wait(timeout=420) == 0, job.output[-6000:]
    assert steps(metrics) == list(range(1, total + 1)), job.output[-6000:]  # every step exactly once
    assert "restart 1" in job.output and "restart 2" not in job.output
    saved = sorted(int(p.name.removeprefix("global_step")) for p in (tmp_path / "ckpt").glob("global_step*"))
    assert saved[-1] == total and 5 <= saved[0] < total, saved  # the pre-emption's checkpoint, then the end's


def test_data_prep_sbatch_builds_the_one_process_dataset(slurm, tmp_path):
    stdlib = Path(json.__file__).parents[1]
    inputs = sorted(str(p) for pkg in ("json", "email") for p in (stdlib / pkg).glob("*.py"))
    options = ["--val-fraction", "0.1", "--shard-bytes", "65536", "--seed", "3"]
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", *inputs, "--output", str(tmp_path / "one"),
                    *options], cwd=REPO, check=True, capture_output=True)
    job = Job(slurm, tmp_path / "job.out", "--ntasks=2", str(SLURM_DIR / "data_prep.sbatch"), *inputs,
              "--output", str(tmp_path / "mpi"), *options)
    assert job.wait() == 0, job.output
    output = job.output
    # One summary: the two tasks were ranks of one MPI job, not two separate builds.
    assert output.count("fingerprint:") == 1, output
    one, mpi = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "mpi"))
    assert mpi["fingerprint"] == one["fingerprint"]
    assert mpi["shards"] == one["shards"]
    assert len(one["shards"]) > 2
    verify = subprocess.run([sys.executable, "-m", "data_prep.verify", str(tmp_path / "mpi")], cwd=REPO,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
