"""What ends a run on a fault, and with which exit code (the README's "Faults" table).

Every fault is decided alike on every rank, so that all ranks stop after the same step
and none is left waiting in a collective for one that has given up.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Callable, Iterable

import numpy as np
import torch

EXIT_SETUP_ERROR = 2  # bad config, layout, data or --load: nothing trained
EXIT_STOPPED = 3  # stopped by a signal after saving a checkpoint: resume with --load
EXIT_NON_FINITE = 4  # train.max_skipped_steps skipped steps in a row, or a save of non-finite state refused
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (e.g. a full disk); `latest` names the last complete one
EXIT_CORRUPT_DATA = 6  # a corrupt shard met with data.on_corrupt: error
EXIT_DAMAGED_CHECKPOINT = 7  # --load of a damaged checkpoint with no intact one to fall back to


class RunFault(RuntimeError):
    """A fault that ends a run with its own exit code, raised on every rank alike."""

    exit_code = 1


class NonFiniteError(RunFault):
    exit_code = EXIT_NON_FINITE


class SaveError(RunFault):
    exit_code = EXIT_SAVE_FAILED


class CorruptData(RunFault):
    exit_code = EXIT_CORRUPT_DATA


class DamagedCheckpoint(RunFault):
    exit_code = EXIT_DAMAGED_CHECKPOINT


def non_finite_count(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """How many of `tensors` hold a NaN or Inf, as a tensor (no host sync)."""
    flags = [~torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return torch.stack(flags).sum() if flags else torch.zeros((), dtype=torch.int64)


def training_state(engine) -> list[torch.Tensor]:
    """This rank's weights, its optimizer's master copies and moments: what a checkpoint holds."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    tensors = [p.detach() for p in engine.module.parameters()]
    tensors += [p.detach() for group in inner.param_groups for p in group["params"]]
    tensors += [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


class SpikeDetector:
    """Flags a loss above mean + sigma standard deviations of the last `window` steps' losses
    (OLMo-core flags 6 sigma); spikes and non-finite losses stay out of the window. Every
    rank sees the same losses (the engine's data-parallel mean), so all flag alike."""

    def __init__(self, window: int, sigma: float, losses: Iterable[float] = ()) -> None:
        self.sigma = sigma
        self.losses: deque[float] = deque(losses, maxlen=window)

    def threshold(self) -> float | None:
        if not self.losses or len(self.losses) < self.losses.maxlen:
            return None
        return float(np.mean(self.losses) + self.sigma * np.std(self.losses))

    def is_spike(self, loss: float, flagged: bool | None = None) -> bool:
        """Whether `loss` is a spike (`flagged`: the verdict the step guard took on the device
        against `threshold()`); a loss that is not joins the window."""
        threshold = self.threshold()
        spike = flagged if flagged is not None else threshold is not None and loss > threshold
        if not spike and math.isfinite(loss):
            self.losses.append(loss)
        return spike


# --- test-only: faults injected for real into a training run ---

INJECT_FAULT = "MEGATRAIN_TEST_INJECT_FAULT"  # "WHAT@STEP@RANK,...", WHAT in FAULTS
SPIKE_FACTOR = 50.0


def planned_faults(rank: int) -> dict[int, str]:
    """The faults the test asked this rank to inject, by optimizer step."""
    plan = {}
    for item in filter(None, os.environ.get(INJECT_FAULT, "").split(",")):
        what, step, at_rank = item.split("@")
        if int(at_rank) == rank:
            plan[int(step)] = what
    return plan


def inject_fault(engine, what: str) -> Callable[[], None]:
    """A NaN in this rank's first parameter ("param": it stays, no skipped step overwrites it),
    or in the loss of the next optimizer step ("loss"), or that loss SPIKE_FACTOR times as
    large ("spike"); returns what undoes it after that step."""
    if what == "param":
        with torch.no_grad():
            next(engine.module.parameters()).view(-1)[0] = float("nan")
        return lambda: None
    factor = {"loss": float("nan"), "spike": SPIKE_FACTOR}.get(what)
    if factor is None:
        raise ValueError(f"{INJECT_FAULT}: unknown fault {what!r} (param, loss or spike)")
    module, loss_fn = engine.module, engine.module.loss_fn
    module.loss_fn = lambda *args: loss_fn(*args) * factor
    return lambda: setattr(module, "loss_fn", loss_fn)
