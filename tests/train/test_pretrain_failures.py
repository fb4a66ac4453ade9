"""Jobs that must fail fast and cleanly: bad setup, a rank that dies or hangs mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ..distributed import CPU_ENV, PRETRAIN, REPO, free_port, running_ranks, start_ranks, wait_ranks

TINY = str(REPO / "configs" / "tiny.yaml")
DEADLINE_S = 120


@pytest.mark.parametrize("ranks, options, reason", [
    (4, ["--pp", "3", "--data", "{shards}"], "pp * tp = 3 * 1 = 3 does not divide the world size 4"),
    # only the first and last stage read data: the middle one must hear of it too
    (3, ["--pp", "3", "--data", "/nonexistent"], "(/nonexistent): no such directory"),
], ids=["layout", "data"])
def test_setup_errors_exit_nonzero_on_every_rank_with_the_reason(tiny_shards, cpu_comm, tmp_path, ranks,
                                                                 options, reason):
    options = [o.format(shards=tiny_shards) for o in options]
    procs = start_ranks("torchrun-env", ranks, ["--config", TINY, *options], tmp_path)
    job = wait_ranks(procs, tmp_path, timeout=90)
    assert job.rank_codes == [2] * ranks, job.output[-3000:]
    assert job.output.count(reason) == ranks


@pytest.mark.parametrize("how, options", [
    (signal.SIGKILL, []),  # peers see the broken connections
    # only the collective timeout can tell; it also bounds how far apart the 4 ranks may start
    (signal.SIGSTOP, ["--set", "parallel.timeout_s=15"]),
], ids=["killed", "hung"])
def test_a_lost_rank_brings_every_rank_down(tiny_shards, cpu_comm, tmp_path, how, options):
    metrics = tmp_path / "metrics.jsonl"
    args = ["--config", TINY, "--data", str(tiny_shards), "--pp", "2", "--tp", "2", "--train-steps", "100000",
            "--metrics", str(metrics), *options]
    with running_ranks("torchrun-env", 4, args, tmp_path) as procs:
        deadline = time.monotonic() + DEADLINE_S
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.2)
        lost, others = procs[1], procs[:1] + procs[2:]  # a tensor-parallel peer on the first stage
        lost.send_signal(how)
        lost_at = time.monotonic()
        job = wait_ranks(others, tmp_path, timeout=DEADLINE_S)
        waited = time.monotonic() - lost_at
    assert job.returncode != 124 and waited < DEADLINE_S, f"ranks still running {waited:.0f} s later"
    assert all(code != 0 for code in job.rank_codes), job.rank_codes


def test_a_missing_master_is_a_one_line_error_in_bounded_time(tiny_shards, tmp_path):
    """Rank 1 of 2 with nobody listening at the master's port."""
    env = {**os.environ, **CPU_ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(PRETRAIN), "--config", TINY, "--data", str(tiny_shards),
                             "--set", "parallel.timeout_s=5"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=DEADLINE_S)
    assert result.returncode == 2, result.stderr[-3000:]
    assert time.monotonic() - start < DEADLINE_S
    assert f"did not meet at the rendezvous master 127.0.0.1:{env['MASTER_PORT']} within 5 s" in result.stderr
