"""Stopping on SIGTERM / SIGUSR1 (pre-emption): finish the step, checkpoint, exit.

The first signal only sets a flag; every rank all-reduces it after each step, so all
ranks stop after the same step even when the signal reached some of them only. A
second signal exits at once, unless it comes within REPEAT_S of the first: Slurm's
`scancel --signal=USR1 --full` delivers it twice, once directly and once through srun,
and Python runs a handler only between bytecodes, so two deliveries a moment apart
are handled seconds apart when the second lands in a long collective or save.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from .distributed import agree
from .faults import EXIT_STOPPED  # noqa: F401  (callers import it from here too)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_S = 10.0  # a signal handled this soon after the first is the same request delivered twice


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None
        self.received_at = 0.0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            if time.monotonic() - self.received_at > REPEAT_S:
                os._exit(128 + signum)  # a second request: no step, no save
            return
        self.signal, self.received_at = signum, time.monotonic()

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: call it on every rank)."""
        return bool(agree(int(self.signal is not None), dist.ReduceOp.MAX))
