"""Joining the job's process group, whichever launcher started this process.

`deepspeed` and torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
under `mpirun` DeepSpeed discovers them through mpi4py; under `srun` they come from
SLURM's variables; a plain `python` process is a world of one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.accelerator import get_accelerator

MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
DEFAULT_PORT = 29500
STALE_BUILD_LOCK_S = 300  # a build takes well under a minute


class RendezvousError(RuntimeError):
    """The ranks could not meet: a wrong master address or port, or a host that is down."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    launcher: str


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (a rendezvous may take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(env: dict[str, str]) -> str:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                           check=True).stdout.split()
    return hosts[0]


def discover_launcher(env: dict[str, str] | None = None) -> str:
    """Which launcher started this process; fills in the torch.distributed variables
    for srun and for a plain single process (MPI is left to DeepSpeed's discovery)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return "deepspeed"
    if any(v in env for v in MPI_VARIABLES):
        return "mpi"
    if "SLURM_STEP_NUM_TASKS" in env:  # set by srun for the tasks of a step, not by sbatch
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env)
        env.setdefault("MASTER_PORT", str(DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        return "srun"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return "python"


def build_cpu_comm_op() -> None:
    """JIT-build (or load) DeepSpeed's shared-memory CPU comm op one process at a time:
    every rank of a first run building it at once can crash the run.

    torch's JIT loader also guards every load with a lock file in the build directory,
    and waits forever on one that a process killed while loading left behind; holding
    our lock, such an old file can only be stale, so it is removed.

    The build runs the first `ninja` on PATH, and two ninja versions (the system's and
    the venv's) each take the other's build for stale: always use this Python's own.
    """
    if get_accelerator().device_name() != "cpu":
        return
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    from torch.utils.cpp_extension import _get_build_directory

    builder = ShareMemCommBuilder()
    with open(Path(tempfile.gettempdir()) / "megatrain-shm-comm-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        torch_lock = Path(_get_build_directory(builder.name, verbose=False)) / "lock"
        if torch_lock.exists() and time.time() - torch_lock.stat().st_mtime > STALE_BUILD_LOCK_S:
            torch_lock.unlink(missing_ok=True)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
        try:
            builder.load(verbose=False)
        finally:
            os.environ["PATH"] = path


def local_ranks() -> int:
    """How many ranks of the job run on this machine, as the launcher says (1 if it does not)."""
    return next((int(os.environ[v]) for v in LOCAL_SIZE_VARIABLES if v in os.environ), 1)


def _limit_cpu_threads() -> None:
    """Share the cores among the local ranks unless the user chose (OMP_NUM_THREADS)."""
    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks()))


def init_distributed(timeout_s: float) -> World:
    """Join the process group; any collective waiting longer than timeout_s fails (and the
    rank exits) rather than hanging on a dead or stuck peer."""
    launcher = discover_launcher()
    build_cpu_comm_op()
    _limit_cpu_threads()
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed creates its pipe, data and model groups without a timeout, and torch gives
    # those its own default (30 min for gloo, 10 for NCCL), not the world's: make it ours.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    try:
        deepspeed.init_distributed(auto_mpi_discovery=launcher == "mpi", verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", DEFAULT_PORT)),
                                   timeout=timeout)
    except dist.DistError as e:  # the store's connect or wait timed out
        master = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        reason = str(e).splitlines()[0]
        raise RendezvousError(f"the ranks did not meet at the rendezvous master {master} within "
                              f"{timeout_s:.0f} s (parallel.timeout_s); check MASTER_ADDR / --master_addr "
                              f"or the hostfile's first host, and that every rank was started: {reason}") from None
    local_rank = int(os.environ["LOCAL_RANK"])
    if get_accelerator().device_name() == "cpu":
        _release_shm_buffer()
    else:  # before any collective: barriers and object collectives use the current device
        get_accelerator().set_device(local_rank)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, launcher)


def agree(value: int, op: dist.ReduceOp = dist.ReduceOp.MAX) -> int:
    """`value` reduced by `op` over every rank (a collective: call it on each).
    The tensor lives on the accelerator's current device: NCCL has no CPU tensors."""
    tensor = torch.tensor([value], dtype=torch.int64, device=get_accelerator().current_device_name())
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def leave_process_group(wait_for_peers: bool = True) -> None:
    """Tear the process group down before the interpreter exits: a rank that exits with
    gloo's threads alive, or while a peer still talks to it, aborts ("terminate called
    without an active exception") and fails a run that had finished. After a run, wait
    for every rank first; after an error some ranks may never come, so do not wait."""
    if not dist.is_initialized():
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """Leave the process once its run is over, its process group torn down and its files
    closed, without the interpreter's own teardown: there, torch's gloo threads sometimes
    abort a rank that has finished ("terminate called without an active exception", exit
    -6; seen in 2 of 4 test-suite runs, on a non-zero rank after the last step)."""
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun DeepSpeed started MPI: mpirun waits for its finalize
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU comm op (69 MB, made when all
    ranks share a host), which DeepSpeed never removes: every run would leave its ranks'
    buffers in memory for good. Each rank maps all the buffers before init returns, so
    once every rank is past it the names can go; the memory goes with the last rank to
    exit, however it exits."""
    dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}").unlink(missing_ok=True)
