"""Stopping on SIGTERM / SIGUSR1 (pre-emption): finish the step, checkpoint, exit.

The first signal only sets a flag; every rank all-reduces it after each step, so all
ranks stop after the same step even when the signal reached some of them only. A
second signal exits at once.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STOPPED = 3  # stopped by a signal after saving a checkpoint: resume with --load


class StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            os._exit(128 + signum)  # the second signal: no step, no save
        self.signal = signum

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: call it on every rank)."""
        flag = torch.tensor([1 if self.signal is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
