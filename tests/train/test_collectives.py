"""Scalars agreed by all ranks (`agree`, the stop request) on the accelerator's device."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist

from megatrain.train import distributed
from megatrain.train.signals import STOP_SIGNALS, StopRequest

from ..distributed import run_ranks


def agreements(rank: int, size: int) -> dict[str, object]:
    stop = StopRequest()
    before = stop.agreed()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # the request reaches one rank only
    return {"max": distributed.agree(rank), "sum": distributed.agree(rank + 1, dist.ReduceOp.SUM),
            "min": distributed.agree(rank, dist.ReduceOp.MIN), "stop before": before, "stop after": stop.agreed()}


def test_every_rank_gets_the_same_reduced_value():
    expected = {"max": 1, "sum": 3, "min": 0, "stop before": False, "stop after": True}
    assert run_ranks(agreements, 2) == [expected, expected]


class _Spied(Exception):
    pass


def test_the_agreed_tensor_lives_on_the_accelerators_current_device(monkeypatch):
    """NCCL reduces only tensors on the current GPU: `agree` must build its tensor on the
    device DeepSpeed's accelerator names (here a stand-in naming `meta`, as CPU runs name
    the CPU itself), not on the CPU by default."""
    class Accelerator:
        def current_device_name(self) -> str:
            return "meta"

    seen = []

    def all_reduce(tensor: torch.Tensor, **kwargs) -> None:
        seen.append(tensor.device)
        raise _Spied

    monkeypatch.setattr(distributed, "get_accelerator", Accelerator)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(_Spied):
        distributed.agree(1)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        with pytest.raises(_Spied):
            StopRequest().agreed()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen == [torch.device("meta")] * 2
