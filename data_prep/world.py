"""Who else is working on this job: one process, or the ranks of an MPI job (mpi4py).

MPI is detected from the launcher's environment (mpirun/mpiexec, srun) and mpi4py is
imported only then, so that a plain run never needs an MPI installation.
"""

from __future__ import annotations

import os
from typing import Any

# World-size variables set by Open MPI, MPICH/Intel MPI (PMI) and Slurm's srun.
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


class World:
    """A single process: collectives are identities."""

    rank = 0
    size = 1

    def barrier(self) -> None:
        pass

    def bcast(self, value: Any) -> Any:
        return value

    def allgather(self, value: Any) -> list[Any]:
        return [value]

    def abort(self, code: int) -> None:
        raise SystemExit(code)


class MpiWorld(World):
    def __init__(self) -> None:
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()

    def barrier(self) -> None:
        self._comm.barrier()

    def bcast(self, value: Any) -> Any:
        return self._comm.bcast(value, root=0)

    def allgather(self, value: Any) -> list[Any]:
        return self._comm.allgather(value)

    def abort(self, code: int) -> None:
        self._comm.Abort(code)  # stops every rank, also those waiting in a collective


def detect_world() -> World:
    launched = any(int(os.environ.get(name, "1") or 1) > 1 for name in _SIZE_VARIABLES)
    return MpiWorld() if launched else World()
