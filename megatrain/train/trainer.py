"""One pretraining run: the engine, its data, the loop and what it reports.

The state of a run between optimizer steps is the engine's (model, optimizer, LR
schedule, step count) plus `client_state()` (the data position and the resolved
config): a checkpoint holds both, so that a resumed run continues where this left off.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from megatrain.config import RunConfig, config_to_dict
from megatrain.data import ByteStream, sequential_windows
from megatrain.parallel import MegabytePipeline, model_flops_per_byte, plan_layout

from .distributed import init_distributed
from .ds_config import deepspeed_config
from .metrics import MetricsLog, bits_per_byte, measure_matmul_tflops
from .optim import build_optimizer, lr_schedule

T = TypeVar("T")
Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs for the first stage, targets for the last)


class SetupError(RuntimeError):
    """A problem found before training, on some rank, reported by every rank."""


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to the run config."""

    metrics: str | None = None
    save: str | None = None
    load: str | None = None


def on_every_rank(what: str, fn: Callable[[], T]) -> T:
    """fn() on every rank; if it fails on any rank, SetupError on all of them, so that no
    rank is left waiting in a collective for one that has given up."""
    try:
        result, error = fn(), None
    except Exception as e:  # reported below, on every rank
        result, error = None, f"{what}: {e}"
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        raise SetupError(failed[0])
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def as_batches(micro_batches: Iterator[torch.Tensor]) -> Iterator[Batch]:
    """Byte micro-batches as the pipeline engine reads them: the bytes are both the first
    stage's input and the last stage's targets (the model shifts them itself)."""
    for x in micro_batches:
        x = x.long()
        yield x, x


class Trainer:
    """Build the engine for cfg on the processes of this job, then `run()` to train."""

    def __init__(self, cfg: RunConfig, options: RunOptions = RunOptions()) -> None:
        self.cfg, self.options = cfg, options
        self.world = init_distributed(cfg.parallel.timeout_s)
        self.layout = plan_layout(cfg, self.world.size)  # the same verdict on every rank
        coord = self.layout.topology().get_coord(self.world.rank)
        self.stage, self.dp_rank = coord.pipe, coord.data
        self.reads_data = self.stage in (0, self.layout.pp - 1)  # only they load micro-batches
        seed_everything(cfg.train.seed)
        self.train_data = on_every_rank("training data", self._open_train_data)
        self.val_batches = on_every_rank("validation data", self._load_val_batches)
        model = MegabytePipeline(cfg.model, self.layout, cfg.train.seed, cfg.parallel.partition_method,
                                 activation_checkpoint_interval=int(cfg.train.activation_checkpointing))
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg.train),
            lr_scheduler=lr_schedule(cfg.train, cfg.train.train_steps),
            config=deepspeed_config(cfg, self.layout))
        self.batches = as_batches(self.train_data) if self.train_data is not None else None
        if options.load:
            self.load(options.load)
        self.metrics = on_every_rank("--metrics", self._open_metrics)

    def _open_metrics(self) -> MetricsLog | None:
        """Rank 0 reports; MFU is measured against train.peak_tflops or the device's own."""
        if self.world.rank != 0:
            return None
        t = self.cfg.train
        peak = t.peak_tflops or measure_matmul_tflops(
            self.engine.device, torch.bfloat16 if t.precision == "bf16" else torch.float32)
        return MetricsLog(self.options.metrics, t.log_interval, t.train_steps,
                          model_flops_per_byte(self.cfg.model) / self.world.size, peak, self.engine.monitor)

    def _open_train_data(self) -> ByteStream | None:
        if not self.reads_data:
            return None
        c, t = self.cfg, self.cfg.train
        return ByteStream(c.data.path, "train", c.model.seq_len,
                          global_batch_size=t.micro_batch_size * t.grad_accum_steps * self.layout.dp,
                          micro_batch_size=t.micro_batch_size, dp_rank=self.dp_rank, dp_size=self.layout.dp,
                          seed=t.seed, boundary=c.data.boundary.encode(), on_corrupt=c.data.on_corrupt,
                          prefetch=c.data.prefetch)

    def _load_val_batches(self) -> list[Batch | None]:
        """This rank's micro-batches of the first train.eval_bytes of the val split (whole
        windows, the same number on every data-parallel rank); placeholders on ranks that
        load no data, which only need the count."""
        c, t = self.cfg, self.cfg.train
        if not t.eval_interval:
            return []
        seq_len, micro, dp = c.model.seq_len, t.micro_batch_size, self.layout.dp
        windows = [w for w in sequential_windows(c.data.path, "val", seq_len, t.eval_bytes,
                                                 boundary=c.data.boundary.encode()) if len(w) == seq_len]
        count = len(windows) // (micro * dp)
        if count == 0:
            raise ValueError(f"the first {t.eval_bytes} bytes of the val split hold {len(windows)} whole "
                             f"windows of {seq_len} bytes, fewer than one batch of {micro} x {dp} ranks")
        mine = windows[self.dp_rank * count * micro:(self.dp_rank + 1) * count * micro]
        stacked = [torch.stack(mine[i * micro:(i + 1) * micro]) for i in range(count)]
        return list(as_batches(iter(stacked))) if self.reads_data else [None] * count

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint holds beside the engine's state."""
        return {"config": config_to_dict(self.cfg),
                "data": self.train_data.state_dict() if self.train_data is not None else None}

    def save(self) -> None:
        self.engine.save_checkpoint(self.options.save, client_state=self.client_state())

    def load(self, path: str) -> None:
        loaded, client = self.engine.load_checkpoint(path)
        if loaded is None:
            raise SetupError(f"--load {path}: no checkpoint found")
        if self.train_data is not None and client.get("data"):
            self.train_data.load_state_dict(client["data"])

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over a global batch; its metrics."""
        engine = self.engine
        lr = engine.get_lr()[0]
        start = time.perf_counter()
        loss = engine.train_batch(self.batches).item()
        seconds = time.perf_counter() - start
        bytes_per_s = engine.train_batch_size() * self.cfg.model.seq_len / seconds
        record = {"step": engine.global_steps, "loss": loss, "bpb": bits_per_byte(loss), "lr": lr,
                  "bytes_per_s": bytes_per_s, "samples": engine.global_samples, "step_s": seconds}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    def evaluate(self) -> dict[str, float]:
        """Loss and bits per byte on the val split's first eval_bytes."""
        batches = iter(self.val_batches) if self.reads_data else None
        loss = self.engine.eval_batch(batches, num_micro_batches=len(self.val_batches)).item()
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss)}

    def run(self) -> None:
        """Train up to train.train_steps optimizer steps (counting those of a resumed run)."""
        t, save = self.cfg.train, self.options.save
        saved = self.engine.global_steps  # nothing new to save before the first step
        while self.engine.global_steps < t.train_steps:
            record = self.train_step()
            step = record["step"]
            if t.eval_interval and step % t.eval_interval == 0:
                record.update(self.evaluate())
            if self.metrics:
                self.metrics.write(record)
            if save and t.save_interval and step % t.save_interval == 0:
                self.save()
                saved = step
        if save and saved != self.engine.global_steps:
            self.save()

    def close(self) -> None:
        if self.train_data is not None:
            self.train_data.close()
        if self.metrics:
            self.metrics.close()
