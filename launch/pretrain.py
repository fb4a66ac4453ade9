#!/usr/bin/env python
"""Pretrain MEGABYTE: `deepspeed [launcher options] launch/pretrain.py --config CONFIG --data DIR ...`.

Also runs as plain `python` (one process), under `mpirun` and under `srun`; see
`python launch/pretrain.py --help`. Everything it does lives in `megatrain.train`.
"""

import logging
import os
import sys

from megatrain.train import main

if __name__ == "__main__":
    code = main()
    # The run is over, its process group torn down and its files closed. Leave without the
    # interpreter's own teardown: there, torch's gloo threads sometimes abort a rank that
    # has finished ("terminate called without an active exception", exit -6; seen in 2 of
    # 4 test-suite runs, on a non-zero rank after the last step).
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun DeepSpeed started MPI: mpirun waits for its finalize
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
