"""launch/slurm/*.sbatch on a real one-node Slurm cluster (see conftest.py)."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from pathlib import Path

from ..distributed import REPO

SLURM_DIR = REPO / "launch" / "slurm"


def sbatch(env: dict[str, str], log: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`sbatch --wait` from the repository root: returns when the job has ended, with
    the job's exit code; its output is appended to `log`."""
    cmd = ["sbatch", "--wait", "--parsable", f"--output={log}", *args]
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--user={getpass.getuser()}"], env=env)  # the test cluster's jobs are ours
        raise


def test_a_batch_job_runs_its_tasks(slurm, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(slurm, log, "--ntasks=2", "--wrap", "srun hostname")
    assert job.returncode == 0, job.stderr + log.read_text()
    assert len(log.read_text().split()) == 2


def test_data_prep_sbatch_builds_the_one_process_dataset(slurm, tmp_path):
    stdlib = Path(json.__file__).parents[1]
    inputs = sorted(str(p) for pkg in ("json", "email") for p in (stdlib / pkg).glob("*.py"))
    options = ["--val-fraction", "0.1", "--shard-bytes", "65536", "--seed", "3"]
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", *inputs, "--output", str(tmp_path / "one"),
                    *options], cwd=REPO, check=True, capture_output=True)
    log = tmp_path / "job.out"
    job = sbatch(slurm, log, "--ntasks=2", str(SLURM_DIR / "data_prep.sbatch"), *inputs,
                 "--output", str(tmp_path / "mpi"), *options)
    output = log.read_text()
    assert job.returncode == 0, job.stderr + output
    # One summary: the two tasks were ranks of one MPI job, not two separate builds.
    assert output.count("fingerprint:") == 1, output
    one, mpi = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "mpi"))
    assert mpi["fingerprint"] == one["fingerprint"]
    assert mpi["shards"] == one["shards"]
    assert len(one["shards"]) > 2
    verify = subprocess.run([sys.executable, "-m", "data_prep.verify", str(tmp_path / "mpi")], cwd=REPO,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
