#!/usr/bin/env python
"""Pretrain MEGABYTE: `deepspeed [launcher options] launch/pretrain.py --config CONFIG --data DIR ...`.

Also runs as plain `python` (one process), under `mpirun` and under `srun`; see
`python launch/pretrain.py --help`. Everything it does lives in `megatrain.train`.
"""

import sys

from megatrain.train import main

if __name__ == "__main__":
    sys.exit(main())
