"""The one harness for multi-process tests (CPU, gloo).

- `run_ranks(fn, world_size, *args)`: fn(rank, world_size, *args) in fresh spawned
  processes that share a gloo process group; returns each rank's result.
- `launch(launcher, nprocs, args)`: `launch/pretrain.py` as a real job under the
  `deepspeed` launcher, `mpirun` or plain `python`, or as rank processes started
  here with the variables a launcher would set ("slurm-env": srun's, the real `srun`
  is run by tests/cluster/test_slurm.py; "torchrun-env": torchrun's); `start_ranks` / `wait_ranks` for tests that
  need the rank processes themselves (e.g. to kill one), `running_ranks` when the
  test may fail before they end.
- the session fixtures `cpu_comm` and `tiny_shards` live in tests/conftest.py (there,
  each runs once per session; imported into several conftests, once per import).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"
BIN = Path(sys.executable).parent
CPU_ENV = {"DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A free port can be taken by another program between free_port and the rendezvous that
# binds it: a launch that failed so is started again on a new port, up to PORT_TRIES times.
PORT_TRIES = 3


def lost_its_port(output: str) -> bool:
    return "address already in use" in output.lower()


# One thread per rank: the test models are far too small to gain from more, and
# spinning OpenMP threads of several ranks on a few shared cores slow everything down.
THREADS = "1"


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(CPU_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(int(THREADS))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        results.put((rank, True, _as_bytes(fn(rank, world_size, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# A tensor put on a torch.multiprocessing queue travels as a handle to shared memory
# that the parent opens through the child, so a child that has already exited resets
# the connection: results travel as bytes instead.
def _as_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


class PortLost(Exception):
    pass


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` spawned ranks; their results by rank.

    fn must be importable (a module-level function); a failing rank fails the call
    with its traceback, and no rank outlives the call.
    """
    for _ in range(PORT_TRIES - 1):
        try:
            return _run_ranks_once(fn, world_size, args, timeout, free_port())
        except PortLost:
            pass
    return _run_ranks_once(fn, world_size, args, timeout, free_port())


def _run_ranks_once(fn: Callable, world_size: int, args: tuple, timeout: float, port: int) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(out) < world_size:
            rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            if not ok:
                raise (PortLost if lost_its_port(value) else AssertionError)(f"rank {rank} failed:\n{value}")
            out[rank] = _from_bytes(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]


@dataclass
class Job:
    """A finished launch: its exit code (each rank's, where the test started them), the
    output of every process and the master port its ranks met at."""

    returncode: int
    output: str
    seconds: float
    rank_codes: list[int] | None = None
    port: int | None = None


def _launcher_command(launcher: str, nprocs: int, port: int) -> list[str]:
    python = [sys.executable, "-u"]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(port)]
    if launcher == "mpirun":
        return [str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", str(nprocs),
                "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT", *python]
    if launcher == "python":
        assert nprocs == 1, "plain python runs one process"
        return python
    raise ValueError(f"unknown launcher {launcher!r}")


def _rank_env(launcher: str, rank: int, nprocs: int, port: int) -> dict[str, str]:
    """What `srun` ("slurm-env") or torchrun ("torchrun-env") would set for one rank."""
    if launcher == "slurm-env":
        return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(nprocs),
                "SLURM_STEP_NUM_TASKS": str(nprocs), "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
    if launcher == "torchrun-env":
        return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    raise ValueError(f"unknown per-rank launcher {launcher!r}")


def _base_env(nprocs: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_", "OMPI_", "PMIX_"))}
    return {**env, **CPU_ENV, "OMP_NUM_THREADS": THREADS, "MASTER_PORT": str(port)}


def start_ranks(launcher: str, nprocs: int, args: list[str], log_dir: Path, port: int | None = None,
                program: tuple[str, ...] = (str(PRETRAIN),)) -> list[subprocess.Popen]:
    """Start `pretrain.py args` (or another program) as `nprocs` rank processes with `srun`'s
    ("slurm-env") or torchrun's ("torchrun-env") environment."""
    port = port or free_port()
    procs = []
    for rank in range(nprocs):
        env = {**_base_env(nprocs, port), **_rank_env(launcher, rank, nprocs, port)}
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-u", *program, *args], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


@contextlib.contextmanager
def running_ranks(launcher: str, nprocs: int, args: list[str], log_dir: Path) -> Iterator[list[subprocess.Popen]]:
    """`start_ranks`, killing the ranks still running when the block ends: a test that fails
    while they train must not leave them to load the rest of the suite."""
    procs = start_ranks(launcher, nprocs, args, log_dir)
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_ranks(procs: list[subprocess.Popen], log_dir: Path, timeout: float) -> Job:
    """Wait for every rank (killing all at the deadline); the worst exit code wins."""
    start = time.monotonic()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, start + timeout - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append(124)
    output = "".join(f"--- rank {r}\n{(log_dir / f'rank{r}.log').read_text()}" for r in range(len(procs)))
    return Job(max(codes, key=abs), output, time.monotonic() - start, codes)


def launch(launcher: str, nprocs: int, args: list[str], log_dir: Path, timeout: float = 300,
           program: tuple[str, ...] = (str(PRETRAIN),)) -> Job:
    """Run `launch/pretrain.py args` (or another program) on `nprocs` ranks started by
    `launcher`: deepspeed, mpirun, python (one rank), slurm-env or torchrun-env (rank processes
    started here with srun's or torchrun's variables)."""
    for _ in range(PORT_TRIES - 1):
        job = _launch_once(launcher, nprocs, args, log_dir, timeout, program, free_port())
        if job.returncode == 0 or not lost_its_port(job.output):
            return job
    return _launch_once(launcher, nprocs, args, log_dir, timeout, program, free_port())


def start_launcher(launcher: str, nprocs: int, command: list[str], port: int) -> subprocess.Popen:
    """`launcher` (deepspeed, mpirun, python) running `command` in a session of its own (so
    that killing its group ends every rank), output piped as text."""
    return subprocess.Popen([*_launcher_command(launcher, nprocs, port), *command], cwd=REPO,
                            env=_base_env(nprocs, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _launch_once(launcher: str, nprocs: int, args: list[str], log_dir: Path, timeout: float,
                 program: tuple[str, ...], port: int) -> Job:
    if launcher in ("slurm-env", "torchrun-env"):
        job = wait_ranks(start_ranks(launcher, nprocs, args, log_dir, port, program), log_dir, timeout)
        return Job(job.returncode, job.output, job.seconds, job.rank_codes, port)
    start = time.monotonic()
    proc = start_launcher(launcher, nprocs, [*program, *args], port)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, code = proc.communicate()[0], 124
    return Job(code, output, time.monotonic() - start, port=port)


@contextlib.contextmanager
def tmpfs(under: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "3m") mounted at under/disk for the block (root only: skips otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = under / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
