"""One pretraining run: the engine, its data, the loop and what it reports.

The state of a run between optimizer steps is the engine's (model, optimizer, LR
schedule, step count) plus `client_state()` (the data position, the resolved config,
the layout and the code version) and each rank's RNG state: a checkpoint holds all of
it, so that a resumed run continues exactly where this one left off
(`checkpointing` for how saves are committed and loads checked).
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from megatrain.checkpoint import (DamagedCheckpointError, commit, is_universal, partial_tag, read_client_state,
                                  resolve_tag)
from megatrain.config import RunConfig, config_to_dict
from megatrain.data import ByteStream, MixedStream, read_split
from megatrain.data.format import CorruptShardError
from megatrain.data.mixture import Source, mixture_change, open_sources
from megatrain.parallel import MegabytePipeline, model_flops_per_byte, plan_layout, seed_rank_stream
from megatrain.scoring import pooled
from megatrain.scoring.pipeline import Batch, EvalPlan, pipeline_bits_per_byte, plan_evaluation

from . import checkpointing
from .checkpointing import SafeCheckpointEngine
from .distributed import agree, init_distributed
from .ds_config import deepspeed_config
from .faults import (CorruptData, DamagedCheckpoint, NonFiniteError, RunFault, SaveError, SpikeDetector,
                     inject_fault, non_finite_count, planned_faults, training_state)
from .memory import auto_budget_gib, checkpoint_counts, describe_auto, device_memory_gib
from .metrics import (MetricsLog, bits_per_byte, datasheet_bf16_tflops, device_name, measure_matmul_tflops,
                      peak_memory_bytes)
from .optim import build_optimizer, lr_schedule
from .resharding import load_resharded
from .signals import StopRequest
from .step_guard import StepGuard

T = TypeVar("T")


class SetupError(RuntimeError):
    """A problem found before training, on some rank, reported by every rank."""


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to the run config."""

    metrics: str | None = None
    save: str | None = None
    load: str | None = None
    keep_last: int | None = None  # complete checkpoints kept under `save` (all when None)
    allow_data_change: bool = False  # resume on other data (another dataset or mixture)


def on_every_rank(what: str, fn: Callable[[], T], fails_as: type[Exception] = SetupError) -> T:
    """fn() on every rank; if it fails on any rank, `fails_as` on all of them (or the
    RunFault it raised, which has an exit code of its own), so that no rank is left waiting
    in a collective for one that has given up."""
    try:
        result, error = fn(), None
    except Exception as e:  # reported below, on every rank
        result, error = None, (f"{what}: {e}", type(e) if isinstance(e, RunFault) else fails_as)
    errors: list[tuple[str, type[Exception]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        message, kind = failed[0]
        raise kind(message)
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def as_batches(micro_batches: Iterator[torch.Tensor], shape: tuple[int, int], device: torch.device,
               guard: StepGuard) -> Iterator[Batch]:
    """Byte micro-batches as the pipeline engine reads them: the bytes are both the first
    stage's input and the last stage's targets (the model shifts them itself).

    A corrupt shard (data.on_corrupt: error) gives zeros of the micro-batch's `shape` and
    is reported to `guard`, which vetoes the step on every rank: a rank that stopped here
    would leave the others waiting for its activations.

    They cross to a GPU as uint8 (an eighth of int64's bytes), from pinned memory without
    waiting, and are widened to int64 there; the engine's own copy (`clone().to(device)`,
    on the host) would be a blocking int64 transfer."""
    while True:
        try:
            x = next(micro_batches)
        except StopIteration:
            return
        except CorruptShardError as e:
            guard.corrupt = guard.corrupt or e
            x = torch.zeros(shape, dtype=torch.uint8)
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True).long()
        yield x, x


class SavedPartitions(list):
    """A checkpoint's ZeRO partitions, in order, for loading at a larger dp size: DeepSpeed reads
    the state all partitions share (loss scale, clipping) from the one of its own dp rank,
    which a smaller run did not have, so indexing past the end gives partition 0."""

    def __getitem__(self, index):
        return super().__getitem__(index if isinstance(index, slice) or index < len(self) else 0)


class Trainer:
    """Build the engine for cfg on the processes of this job, then `run()` to train."""

    def __init__(self, cfg: RunConfig, options: RunOptions = RunOptions()) -> None:
        self.cfg, self.options = cfg, options
        self.world = init_distributed(cfg.parallel.timeout_s)
        self.layout = plan_layout(cfg, self.world.size)  # the same verdict on every rank
        coord = self.layout.topology().get_coord(self.world.rank)
        self.stage, self.dp_rank, self.tp_rank = coord.pipe, coord.data, coord.model
        self.reads_data = self.stage in (0, self.layout.pp - 1)  # only they load micro-batches
        seed_everything(cfg.train.seed)
        self.sources: list[Source] = on_every_rank("data sources", lambda: open_sources(
            [(s.name, s.path, s.weight) for s in cfg.data.source_list()]))
        self.train_data = on_every_rank("training data", self._open_train_data)
        self.validation = on_every_rank("validation data", self._plan_validation)
        resume_tag = self._resume_tag() if options.load else None
        model = MegabytePipeline(cfg.model, self.layout, cfg.train.seed, cfg.parallel.partition_method,
                                 activation_checkpoint_interval=int(cfg.train.activation_checkpointing),
                                 checkpoint_blocks=self._checkpoint_counts(), compile_blocks=cfg.train.compile,
                                 layout_invariant_dropout=cfg.parallel.layout_invariant_dropout)
        model.to(get_accelerator().current_device_name())  # first: a fused optimizer needs its parameters there
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg.train),
            lr_scheduler=lr_schedule(cfg.train, cfg.train.train_steps),
            config=deepspeed_config(cfg, self.layout))
        t = cfg.train
        # it also makes the gradient norm's collectives alike on every stage (optim.guard_the_gradient_norm)
        self.guard = StepGuard(self.engine, veto_spikes=t.spike_policy != "log" and t.spike_window > 0,
                               shards_met=lambda: len(self._rank_corrupt_shards()))
        self.engine.checkpoint_engine = checkpoint_engine = SafeCheckpointEngine()
        # rank 0 copies DeepSpeed's recovery scripts into --save with each save, past its engine
        copy_scripts = self.engine._copy_recovery_script
        self.engine._copy_recovery_script = lambda path: checkpoint_engine.guarded(lambda: copy_scripts(path))
        # the trainer reports corrupt shards once, from rank 0 (`_report_corrupt_shards`), not every rank
        logging.getLogger("megatrain.data.stream").setLevel(logging.ERROR)
        self.corrupt_shards: set[str] = set()
        self.corrupt_shard_sum = 0  # the guard's last count: corrupt shards met, summed over ranks
        self.batches = None if self.train_data is None else as_batches(
            self.train_data, (t.micro_batch_size, cfg.model.seq_len), self.engine.device, self.guard)
        self.metrics = on_every_rank("--metrics", self._open_metrics)
        self.val_bpb: float | None = None  # the last validation's
        self.skipped_steps = 0  # optimizer steps skipped (a non-finite loss or gradient norm, a vetoed spike)
        self.skipped_in_a_row = 0
        self.rollbacks = 0  # train.spike_policy rollback: reloads of the last checkpoint
        self.resumed_from = resume_tag
        self.spikes = SpikeDetector(cfg.train.spike_window, cfg.train.spike_sigma)
        self.planned_faults = planned_faults(self.world.rank)  # test-only fault injection
        if resume_tag is not None:  # last: no setup step draws from the restored streams
            self.load(resume_tag)
        self.stop = StopRequest()
        self.stopped = False  # set when a signal ended the run early

    @property
    def mixture(self) -> list[dict]:
        """The sources as the checkpoint records them (names, fingerprints, weights)."""
        return [s.record() for s in self.sources]

    def _checkpoint_counts(self) -> tuple[int | None, ...] | None:
        """train.checkpoint_blocks for each pipeline stage; auto for the smallest device of the job."""
        t = self.cfg.train
        if not t.activation_checkpointing:
            return None
        memory_gib = None
        if t.checkpoint_blocks == "auto" and not t.checkpoint_memory_gib:
            device = torch.device(get_accelerator().current_device_name())
            memory_gib = agree(int(device_memory_gib(device) * 1024), dist.ReduceOp.MIN) / 1024
        counts = checkpoint_counts(self.cfg, self.layout, memory_gib)
        if t.checkpoint_blocks == "auto" and self.world.rank == 0:
            print("\n".join(describe_auto(self.cfg, self.layout, counts, auto_budget_gib(self.cfg, memory_gib))),
                  flush=True)
        return counts

    @property
    def fingerprint(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0].fingerprint
        return ", ".join(f"{s.name}={s.fingerprint}" for s in self.sources)

    def _resume_tag(self) -> Path:
        """The tag `--load` resumes: rank 0 alone checks its files' checksums (each rank reading
        every file would multiply the cost) and may fall back to an older tag; then every rank
        checks that one."""
        load = self.options.load

        def verified_tag() -> Path:
            try:
                return resolve_tag(load, verify=True)
            except DamagedCheckpointError as e:
                raise DamagedCheckpoint(str(e)) from None

        chosen = [on_every_rank(f"--load {load}", lambda: verified_tag() if self.world.rank == 0 else None)]
        dist.broadcast_object_list(chosen, src=0)
        return on_every_rank(f"--load {load}", lambda: checkpointing.check_resumable(
            chosen[0], config_to_dict(self.cfg)["model"], self.mixture, self.options.allow_data_change))

    def _open_metrics(self) -> MetricsLog | None:
        """Rank 0 reports; MFU is measured against train.peak_tflops or the device's own, and in
        bf16 also against the device's datasheet peak."""
        if self.world.rank != 0:
            return None
        t, device = self.cfg.train, self.engine.device
        peak = t.peak_tflops or measure_matmul_tflops(device, torch.bfloat16 if t.precision == "bf16" else torch.float32)
        name = device_name(device)
        return MetricsLog(self.options.metrics, t.log_interval, t.train_steps,
                          model_flops_per_byte(self.cfg.model) / self.world.size, peak, name,
                          datasheet_bf16_tflops(name) if t.precision == "bf16" else None, self.engine.monitor)

    def _open_train_data(self) -> ByteStream | MixedStream | None:
        """One source streams in its own order (`ByteStream`), several in their blend (`MixedStream`)."""
        if not self.reads_data:
            return None
        c, t = self.cfg, self.cfg.train
        common = dict(global_batch_size=t.sequences_per_step(self.layout.dp), micro_batch_size=t.micro_batch_size,
                      dp_rank=self.dp_rank, dp_size=self.layout.dp, seed=t.seed, boundary=c.data.boundary.encode(),
                      on_corrupt=c.data.on_corrupt, prefetch=c.data.prefetch)
        if len(self.sources) == 1:
            return ByteStream(self.sources[0].path, "train", c.model.seq_len, **common)
        return MixedStream(self.sources, "train", c.model.seq_len, **common)

    def _plan_validation(self) -> dict[str, EvalPlan] | None:
        """This rank's share of the plain evaluation of each source's val split's first eval_bytes."""
        c, t = self.cfg, self.cfg.train
        if not t.eval_interval:
            return None
        plans = {}
        for source in self.sources:
            data = read_split(source.path, "val", t.eval_bytes, boundary=c.data.boundary.encode())
            plans[source.name] = plan_evaluation(data, c.model.seq_len, c.model.patch_size, t.micro_batch_size,
                                                 self.dp_rank, self.layout.dp, self.reads_data)
        return plans

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint holds beside the engine's state."""
        data = self.train_data.state_dict() if self.train_data is not None else None
        # the micro-batches each stage has run, which key the layers' dropout seeds (streams.LayerSeeds)
        micro_batches = self.engine.module.micro_offset
        return {"config": config_to_dict(self.cfg), "layout": self._layout_record(),
                "data": data, "mixture": self.mixture, "dataset_fingerprint": self.fingerprint,
                "code_version": checkpointing.code_version(), "val_bpb": self.val_bpb,
                "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                "recent_losses": list(self.spikes.losses), "micro_batches": micro_batches}

    def _layout_record(self) -> dict[str, Any]:
        """The layout and the stage boundaries (`PipelineCut`) a checkpoint is saved at."""
        cut = self.engine.module.cut
        return {"pp": self.layout.pp, "tp": self.layout.tp, "dp": self.layout.dp,
                "parts": list(cut.parts), "inside": list(cut.inside)}

    def last_good_tag(self) -> Path | None:
        """The newest complete checkpoint of this run: `latest` under --save, else the --load one."""
        latest = Path(self.options.save) / "latest" if self.options.save else None
        if latest is not None and latest.exists():
            return latest.parent / latest.read_text().strip()
        return self.resumed_from

    def last_good_checkpoint(self) -> str:
        """The checkpoint a run that stops on a fault can be resumed from, for its message."""
        tag = self.last_good_tag()
        return str(tag) if tag else "none (no checkpoint was saved)"

    def save(self) -> None:
        """Checkpoint under a temporary tag, then commit it as the latest (see `checkpointing`).
        Refused when any rank's state is non-finite; a write that fails on any rank (a full
        disk) fails the save on every rank, and its partial files are removed."""
        save_dir, step = Path(self.options.save), self.engine.global_steps
        if agree(int(non_finite_count(training_state(self.engine)))):
            raise NonFiniteError(f"refusing to save step {step}: the weights or optimizer state hold NaN or "
                                 f"Inf; the last good checkpoint is {self.last_good_checkpoint()}")
        partial = save_dir / partial_tag(step)
        self.engine.save_checkpoint(str(save_dir), tag=partial.name, client_state=self.client_state(),
                                    save_latest=False)

        def write_rng_state() -> None:
            if (failure := self.engine.checkpoint_engine.take_failure()) is not None:
                raise failure
            torch.save(checkpointing.rng_state(), checkpointing.rng_file(partial, self.stage, self.tp_rank,
                                                                         self.dp_rank))

        def commit_on_rank0() -> None:
            if self.world.rank == 0:
                commit(save_dir, step)
                checkpointing.prune(save_dir, self.options.keep_last)

        try:
            on_every_rank(f"--save {save_dir}", write_rng_state, SaveError)
            on_every_rank(f"--save {save_dir}", commit_on_rank0, SaveError)
        except SaveError as e:
            if self.world.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise SaveError(f"{e} (saving step {step}); the last complete checkpoint is "
                            f"{self.last_good_checkpoint()}") from None

    def load(self, tag: Path) -> None:
        """Resume from a tag directory that `check_resumable` accepted."""
        client = read_client_state(tag)
        self._load_engine(tag, client)
        self.val_bpb = client.get("val_bpb")
        self.skipped_steps = client.get("skipped_steps", 0)
        self.rollbacks = client.get("rollbacks", 0)
        self.spikes = SpikeDetector(self.cfg.train.spike_window, self.cfg.train.spike_sigma,
                                    client.get("recent_losses", ()))
        change = mixture_change(checkpointing.saved_mixture(client), self.mixture)
        if change is None:
            if self.train_data is not None:
                self.train_data.load_state_dict(client["data"])
        elif self.world.rank == 0:  # --allow-data-change: check_resumable refused it otherwise
            print(f"--allow-data-change: the data differs from the checkpoint's ({change}); "
                  f"it starts from the beginning of its own order", flush=True)

    def _load_engine(self, tag: Path, client: dict[str, Any]) -> None:
        """The model, optimizer, LR schedule, step count and RNG state of `tag`."""
        saved, here = client["layout"], self._layout_record()
        # DeepSpeed's own files fit only the layout and stage boundaries they were saved at
        # (checkpoints from before the boundaries were recorded are resharded; those from
        # before a stage could start inside a block have none inside)
        same = all(saved.get(key, [] if key == "inside" else None) == here[key]
                   for key in ("pp", "tp", "parts", "inside"))
        if is_universal(tag) or not same:
            load_resharded(self.engine, tag, client)
            # no RNG state fits another layout: new streams, not a replay of step 0's
            seed_everything(self.cfg.train.seed + self.engine.global_steps)
            if self.engine.module.rank_streams:
                seed_rank_stream(self.cfg.train.seed + self.engine.global_steps, self.tp_rank)
        else:
            self._load_same_layout(tag, same_dp=saved["dp"] == self.layout.dp)
        self.engine.module.micro_offset = client.get("micro_batches", 0)
        # ZeRO's elastic and our resharded loads restore the schedule but not the groups' learning rates
        for group, lr in zip(self.engine.optimizer.param_groups, self.engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr

    def _load_same_layout(self, tag: Path, same_dp: bool) -> None:
        """DeepSpeed's own load, at any data-parallel size, and this rank's RNG state."""
        engine = self.engine
        loaded, _ = engine.load_checkpoint(str(tag.parent), tag=tag.name, load_optimizer_states=same_dp)
        if loaded is None:
            raise SetupError(f"--load {self.options.load}: DeepSpeed could not load {tag}")
        if not same_dp:
            # DeepSpeed's load_checkpoint refuses ZeRO states of another dp size, though the
            # optimizer re-partitions the elastic ones it saves (merged, then split anew)
            partitions = SavedPartitions(engine._get_all_zero_checkpoints(str(tag.parent), tag.name))
            engine.optimizer.load_state_dict(state_dict_list=partitions,
                                             load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
                                             param_shapes=engine._get_zero_param_shapes())
        rng = checkpointing.load_rng_file(tag, self.stage, self.tp_rank, self.dp_rank)
        if rng is not None:
            checkpointing.set_rng_state(rng)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over a global batch; its metrics."""
        engine = self.engine
        lr = engine.get_lr()[0]
        # once: a rolled-back run comes to that step number again
        undo = inject_fault(engine, self.planned_faults.pop(engine.global_steps + 1)) \
            if engine.global_steps + 1 in self.planned_faults else None
        threshold = self.spikes.threshold() if self.cfg.train.spike_window else None
        self.guard.threshold = threshold
        start = time.perf_counter()
        loss = engine.train_batch(self.batches).item()
        seconds = time.perf_counter() - start
        if undo is not None:
            undo()
        corrupt, spike, shards_met = self.guard.outcome()
        if corrupt:  # data.on_corrupt: error; the update was vetoed on every rank
            def fail_where_met() -> None:
                if self.guard.corrupt is not None:
                    raise self.guard.corrupt
            on_every_rank("training data", fail_where_met, CorruptData)
        bytes_per_s = engine.train_batch_size() * self.cfg.model.seq_len / seconds
        record = {"step": engine.global_steps, "loss": loss, "bpb": bits_per_byte(loss), "lr": lr,
                  "bytes_per_s": bytes_per_s, "samples": engine.global_samples, "step_s": seconds,
                  "peak_memory_gib": peak_memory_bytes(engine.device) / 2**30}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        # DeepSpeed's optimizer skips the update when the gradient norm is NaN / Inf (which a
        # non-finite loss makes it, and the guard's veto of a spike), deciding it alike on every rank
        if self.cfg.train.spike_window and self.spikes.is_spike(loss, spike if self.guard.veto_spikes else None):
            record["loss_spike"] = True
            if self.world.rank == 0:
                print(f"warning: step {record['step']}: loss spike, {loss:.4f} above {threshold:.4f} (mean + "
                      f"{self.cfg.train.spike_sigma:g} sigma of the last {self.cfg.train.spike_window} steps); "
                      f"train.spike_policy {self.cfg.train.spike_policy}", flush=True)
        if engine.was_step_applied():
            self.skipped_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            record["skipped"] = ("loss spike" if spike else "non-finite loss" if not np.isfinite(loss)
                                 else "non-finite gradient norm")
        record["skipped_steps"] = self.skipped_steps
        if shards_met != self.corrupt_shard_sum:  # data.on_corrupt: skip, and some rank met a new corrupt shard
            self.corrupt_shard_sum = shards_met
            self._report_corrupt_shards(record["step"])
        if self.corrupt_shards:
            record["corrupt_shards"] = len(self.corrupt_shards)
        if spike and self.cfg.train.spike_policy == "rollback" and (tag := self.roll_back(record["step"])):
            record["rolled_back_to"] = tag
        if self.metrics:  # rank 0, which reads data (pipeline stage 0)
            record["source_bytes"] = self._source_bytes()
        return record

    def _rank_corrupt_shards(self) -> dict[str, str]:
        """The corrupt shards (path: why) whose windows this rank's data has replaced so far
        (data.on_corrupt: skip); none on a stage that reads no data."""
        return self.train_data.corrupt_shards() if self.train_data is not None else {}

    def _report_corrupt_shards(self, step: int) -> None:
        """Rank 0 names each corrupt shard once, whichever ranks met it."""
        met = [None] * self.world.size
        dist.all_gather_object(met, self._rank_corrupt_shards())
        new = {path: why for shards in met for path, why in shards.items() if path not in self.corrupt_shards}
        self.corrupt_shards.update(new)
        if self.world.rank == 0:
            for path, why in sorted(new.items()):
                print(f"warning: step {step}: data.on_corrupt skip: the windows that touch corrupt shard "
                      f"{path} are replaced by readable ones ({why})", flush=True)

    def roll_back(self, step: int) -> str | None:
        """train.spike_policy rollback: the model and optimizer of the last checkpoint, the data
        where it is now (after the spike's batch: the span since that checkpoint is skipped, as
        PaLM did). Without a checkpoint the spike's update is only skipped."""
        tag = self.last_good_tag()
        if tag is None:
            if self.world.rank == 0:
                print(f"warning: step {step}: no checkpoint to roll back to; the spike's update is skipped",
                      flush=True)
            return None
        on_every_rank(f"rolling back to {tag}", lambda: self._load_engine(tag, read_client_state(tag)))
        self.rollbacks += 1
        if self.world.rank == 0:
            print(f"warning: step {step}: rolled back to {tag}; training goes on from step "
                  f"{self.engine.global_steps + 1} on the data after the spike's batch", flush=True)
        return tag.name

    def _source_bytes(self) -> dict[str, int]:
        """Bytes of the last step drawn from each source."""
        if isinstance(self.train_data, MixedStream):
            return self.train_data.last_step_bytes()
        return {self.sources[0].name: self.engine.train_batch_size() * self.cfg.model.seq_len}

    def evaluate(self) -> dict[str, float]:
        """Loss and bits per byte on each source's val split's first eval_bytes, as `megatrain.evaluate`
        scores them: with several sources, `val_bpb/<name>` each and their byte-weighted mean `val_bpb`."""
        results = {name: pipeline_bits_per_byte(self.engine, plan) for name, plan in self.validation.items()}
        total = pooled(results.values())
        record = {"val_loss": total["nats"] / total["bytes"], "val_bpb": total["bpb"]}
        if len(results) > 1:
            record.update({f"val_bpb/{name}": result["bpb"] for name, result in results.items()})
        return record

    def run(self) -> None:
        """Train up to train.train_steps optimizer steps (counting those of a resumed run)."""
        t, save = self.cfg.train, self.options.save
        if save and self.world.rank == 0:  # what a killed save left behind, even if no step is left to run
            checkpointing.prune(Path(save), keep_last=None)
        saved = self.engine.global_steps  # nothing new to save before the first step
        while self.engine.global_steps < t.train_steps:
            record = self.train_step()
            step = record["step"]
            rolled_back = "rolled_back_to" in record  # the engine is at that checkpoint's step again
            if t.eval_interval and step % t.eval_interval == 0 and not rolled_back:
                record.update(self.evaluate())
                self.val_bpb = record["val_bpb"]  # the model card's, when exported
            if self.metrics:
                self.metrics.write(record)
            if self.skipped_in_a_row >= t.max_skipped_steps:
                raise NonFiniteError(f"{self.skipped_in_a_row} optimizer steps in a row (train.max_skipped_steps) "
                                     f"were skipped for a non-finite loss or gradient norm or a loss spike, up "
                                     f"to step {step}; the last good checkpoint is {self.last_good_checkpoint()}")
            if save and t.save_interval and step % t.save_interval == 0 and not rolled_back:
                self.save()
                saved = step
            if self.stop.agreed():
                self.stopped = True
                break
        if save and saved != self.engine.global_steps:
            self.save()

    def close(self) -> None:
        if self.train_data is not None:
            self.train_data.close()
        if self.metrics:
            self.metrics.close()
