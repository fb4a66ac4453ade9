"""The decision taken before every optimizer step, alike on every rank: apply the update,
or veto it for a loss spike (train.spike_policy skip / rollback) or for a corrupt shard
met with data.on_corrupt: error.

Every pipeline stage runs DeepSpeed's OptimizerStep instruction once per step, after its
last backward; there the guard all-reduces a few flags over all ranks, on the device (no
wait on the host). A vetoed update shows as an infinite gradient norm, which DeepSpeed's
optimizers skip as they skip a NaN: the step is counted, the LR schedule stays put, the
data moves on, and `engine.was_step_applied()` says so on every rank.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.schedule import OptimizerStep

from megatrain.data.format import CorruptShardError

from .optim import guard_the_gradient_norm

CORRUPT, SPIKE, SHARDS = range(3)  # the flags' slots; those before SHARDS veto the update


class StepGuard:
    """Installs itself on a pipeline engine. The trainer sets `threshold` (the loss above
    which this step is a spike, or None) before each step, and its data reports a corrupt
    shard in `corrupt`; `shards_met` counts the corrupt shards this rank's data has
    replaced windows of so far (on_corrupt: skip)."""

    def __init__(self, engine, veto_spikes: bool, shards_met: Callable[[], int]) -> None:
        self.veto_spikes, self.shards_met = veto_spikes, shards_met
        self.threshold: float | None = None
        self.corrupt: CorruptShardError | None = None  # met by this rank's data (on_corrupt: error)
        self.flags = torch.zeros(3, device=engine.device)
        self.veto = torch.zeros((), dtype=torch.bool, device=engine.device)
        guard_the_gradient_norm(engine.optimizer, self.veto)
        optimizer_step = engine._INSTRUCTION_MAP[OptimizerStep]

        def guarded_step(engine, **kwargs) -> None:
            self._decide(engine)
            optimizer_step(engine, **kwargs)

        # the engine runs each instruction from this map (an instance attribute shadows the class's)
        engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, OptimizerStep: guarded_step}

    def _decide(self, engine) -> None:
        self.flags.zero_()
        self.flags[CORRUPT] = float(self.corrupt is not None)
        self.flags[SHARDS] = float(self.shards_met())
        if self.veto_spikes and self.threshold is not None:
            # the step's loss as every stage will see it: DeepSpeed's own mean over data
            # parallelism, broadcast from the last stage (it repeats this after the step)
            loss = engine._aggregate_total_loss()
            self.flags[SPIKE] = (loss > self.threshold).float()
        dist.all_reduce(self.flags)  # summed: a flag is set if any rank set it
        self.veto.copy_(self.flags[:SHARDS].amax() > 0)

    def outcome(self) -> tuple[bool, bool, int]:
        """After the step: (a rank met a corrupt shard, the loss was a spike, corrupt shards
        met over all ranks); reading them waits for the step, as reading its loss does."""
        corrupt, spike, shards = self.flags.tolist()
        return corrupt > 0, spike > 0, int(shards)
