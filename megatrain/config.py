"""The run configuration: typed dataclasses are the schema, YAML files fill them in.

`load_config(path, overrides)` reads a YAML file with `yaml.safe_load`, applies
`key.sub=value` overrides (values parsed as YAML, then checked against the field's
type) and validates the result. Every error names the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from megatrain.model import MegabyteConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def stage_checkpoint_blocks(counts: int | tuple[int | None, ...] | None, stage: int) -> int | None:
    """Pipeline stage `stage`'s count of `train.checkpoint_blocks` (one for all, or a count each)."""
    return counts[stage] if isinstance(counts, tuple) else counts


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int = 1  # sequences per forward on each data-parallel rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step, unless global_batch_size decides
    # Sequences per optimizer step over all data-parallel ranks, whatever their number:
    # grad_accum_steps becomes global_batch_size / (micro_batch_size * dp). 0: not fixed.
    global_batch_size: int = 0
    train_steps: int = 100
    lr: float = 2e-4
    min_lr: float = 0.0
    warmup_steps: int = 500
    decay_power: float = 1.0  # polynomial decay from lr to min_lr over the steps after warmup
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Steps whose loss or gradient norm is NaN / Inf on any rank are skipped on every rank;
    # this many in a row stop the run (exit code 4).
    max_skipped_steps: int = 5
    # A loss above mean + spike_sigma std of the last spike_window steps is a spike
    # (`loss_spike` in the metrics line); 0 switches the detector off. spike_policy: log it
    # and apply the update; skip the update; or rollback: reload the last checkpoint and go
    # on with the data after the spike's batch. Decided alike on every rank.
    spike_window: int = 100
    spike_sigma: float = 6.0
    spike_policy: Literal["log", "skip", "rollback"] = "log"
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 1234
    activation_checkpointing: bool = False
    # With activation_checkpointing, how many transformer blocks of each pipeline stage
    # recompute their activations in the backward pass (null: all); the rest keep them, which
    # is faster where memory allows. The blocks that keep the most activations per FLOP of
    # recomputation go first: the local model's (`megatrain.parallel.cost.recomputed_blocks`).
    # A list gives each stage its own count ([6, 4] at pp=2): the first stages keep the most
    # micro-batches in flight (`bench --figures stages --memory-gib G` finds the counts).
    # auto: each stage's fewest blocks that fit in checkpoint_memory_gib by the estimate of
    # `megatrain.train.memory` (0: 90% of the device's memory; a CPU's RAM shared by its ranks).
    checkpoint_blocks: int | tuple[int, ...] | Literal["auto"] | None = None
    checkpoint_memory_gib: float = 0.0
    # torch.compile each transformer block (state-dict names unchanged); measured no gain on
    # CPU (docs/PERFORMANCE.md), not yet measured on a GPU
    compile: bool = False
    log_interval: int = 10  # console line every N steps
    eval_interval: int = 0  # validation bits per byte every N steps (0: never)
    eval_bytes: int = 1 << 20
    save_interval: int = 0
    keep_last: int = 0  # 0 keeps every checkpoint
    monitor: tuple[Literal["tensorboard", "csv", "wandb"], ...] = ()  # DeepSpeed monitors to switch on
    monitor_dir: str = "runs/monitor"
    peak_tflops: float = 0.0  # per device, for MFU; 0 measures the device's matmul peak
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys

    def accumulation_steps(self, dp: int) -> int:
        """Micro-batches per optimizer step on each of `dp` data-parallel ranks."""
        if self.global_batch_size:
            return self.global_batch_size // (self.micro_batch_size * dp)
        return self.grad_accum_steps

    def sequences_per_step(self, dp: int) -> int:
        """The global batch: sequences per optimizer step over `dp` data-parallel ranks."""
        return self.micro_batch_size * self.accumulation_steps(dp) * dp

    def checkpoint_blocks_problem(self, stages: int) -> str | None:
        """Why checkpoint_blocks cannot serve a pipeline of `stages` stages, or None."""
        counts = self.checkpoint_blocks
        if isinstance(counts, tuple) and len(counts) != stages:
            return (f"lists {len(counts)} counts, one per pipeline stage, but the pipeline has {stages} "
                    f"(parallel.pp / --pp): list {stages}, or give one count for every stage")
        return None

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for each inconsistency; empty when the settings are usable."""
        out = [(name, f"must be positive, got {getattr(self, name)}")
               for name in ("micro_batch_size", "grad_accum_steps", "max_skipped_steps") if getattr(self, name) < 1]
        counts = self.checkpoint_blocks if isinstance(self.checkpoint_blocks, tuple) else (self.checkpoint_blocks,)
        if not counts or any(isinstance(c, int) and c < 0 for c in counts):
            out.append(("checkpoint_blocks", "must be null (every block), a count of at least 0, a list of "
                        "such counts (one per pipeline stage) or auto, "
                        f"got {config_to_dict(self.checkpoint_blocks)}"))
        elif self.checkpoint_blocks is not None and not self.activation_checkpointing:
            out.append(("checkpoint_blocks", f"is {config_to_dict(self.checkpoint_blocks)}, but activation_checkpointing "
                        "is off: set train.activation_checkpointing=true for blocks to be recomputed"))
        if self.checkpoint_memory_gib < 0:
            out.append(("checkpoint_memory_gib", f"must be 0 (90% of the device's) or positive, got "
                        f"{self.checkpoint_memory_gib}"))
        elif self.checkpoint_memory_gib and self.checkpoint_blocks != "auto":
            out.append(("checkpoint_memory_gib", f"is {self.checkpoint_memory_gib}, but checkpoint_blocks is not auto: "
                        "it is auto's budget"))
        if self.global_batch_size < 0:
            out.append(("global_batch_size", f"must be 0 (not fixed) or positive, got {self.global_batch_size}"))
        elif self.global_batch_size and self.grad_accum_steps != 1:
            out.append(("global_batch_size", f"is set ({self.global_batch_size}) and so is grad_accum_steps "
                        f"({self.grad_accum_steps}): set one; global_batch_size derives grad_accum_steps"))
        return out


@dataclass(frozen=True)
class SourceConfig:
    """One dataset of a mixture: `weight` is its share of the training bytes (normalised)."""

    name: str
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # directory of shards + manifest.json (or --data DIR): one source
    sources: tuple[SourceConfig, ...] = ()  # several, blended by weight (or --data NAME=PATH:WEIGHT ...)
    boundary: str = ""  # bytes inserted between documents (UTF-8), default none
    prefetch: int = 4  # micro-batches read ahead
    on_corrupt: Literal["error", "skip"] = "error"

    def source_list(self) -> tuple[SourceConfig, ...]:
        """The sources to train on: `sources`, or `path` as one source named after its directory."""
        if self.sources:
            return self.sources
        return (SourceConfig(Path(self.path).name or self.path, self.path),) if self.path else ()

    def problems(self) -> list[tuple[str, str]]:
        if self.path and self.sources:
            return [("sources", f"is set and so is data.path ({self.path!r}): give one of them")]
        return []


def parse_source(text: str) -> SourceConfig:
    """A `--data` value: NAME=PATH:WEIGHT, NAME=PATH (weight 1) or a plain DIR (named after it)."""
    name, sep, rest = text.partition("=")
    if not sep:
        return SourceConfig(Path(text).name or text, text)
    path, colon, weight = rest.rpartition(":")
    if not colon:
        path, weight = rest, "1"
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"--data {text}: weight {weight!r} is not a number (expected NAME=PATH:WEIGHT)") from None
    if not name or not path:
        raise ConfigError(f"--data {text}: expected NAME=PATH:WEIGHT")
    return SourceConfig(name, path, value)


@dataclass(frozen=True)
class ParallelConfig:
    pp: int = 1
    tp: int = 1
    partition_method: str = "flops"  # balance pipeline stages by: flops (per byte), memory, parameters, uniform
    # Every layout draws the dropout masks one rank draws: each tensor-parallel rank draws
    # whole masks and keeps its slice (tp x the mask work there, and the global attention's
    # dropout outside SDPA). Off: those ranks draw their slices from streams of their own.
    layout_invariant_dropout: bool = False
    timeout_s: float = 90.0  # a collective waiting longer fails, so no rank outlives a dead peer


@dataclass(frozen=True)
class RunConfig:
    model: MegabyteConfig = field(default_factory=MegabyteConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a run config from YAML and apply `key.sub=value` overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{path}: override {item!r}: expected key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value), source=f"{path}: override {item!r}")
    cfg = build(RunConfig, raw, source=str(path))
    problems = [("model", *p) for p in cfg.model.problems()] + [("train", *p) for p in cfg.train.problems()]
    problems += [("data", *p) for p in cfg.data.problems()]
    if problems:
        raise ConfigError("\n".join(f"{path}: {section}.{key}: {msg}" for section, key, msg in problems))
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """The plain (YAML/JSON-able) form of a config, for checkpoints and logs."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {part!r} is not a section")
    node[leaf] = value


def build(cls: type, raw: Any, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {name!r} (known: {', '.join(fields)})")
        values[key] = _coerce(hints[key], value, source, name)
    return cls(**values)


WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _described(tp: Any) -> str:
    """A field type in words, for an error: "a list of an integer" reads as "a list of integers"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_described(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return WORDS.get(tp, str(tp))


def _coerce(tp: Any, value: Any, source: str, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {name}: expected {expected}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        return build(tp, value, source, prefix=f"{name}.")
    if origin is Literal:
        if value not in args:
            raise wrong(" or ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value, source, name)
            except ConfigError:
                pass
        options = [_described(option) for option in args]
        raise wrong(", ".join(options[:-1]) + f" or {options[-1]}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong(f"a list of {len(args)}")
        return tuple(_coerce(a, v, source, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping")
        return value
    if tp is type(None):
        if value is not None:
            raise wrong("null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"config field {name}: unsupported type {tp}")
