#!/usr/bin/env python
"""Pretrain MEGABYTE: `deepspeed [launcher options] launch/pretrain.py --config CONFIG --data DIR ...`.

Also runs as plain `python` (one process), under `mpirun` and under `srun`; see
`python launch/pretrain.py --help`. Everything it does lives in `megatrain.train`.
"""

from megatrain.train import main
from megatrain.train.distributed import exit_without_teardown

if __name__ == "__main__":
    exit_without_teardown(main())
