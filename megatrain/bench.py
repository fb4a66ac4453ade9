"""Benchmark: training throughput, MFU, peak memory, loader and generation speed on one
device; the parallel layouts' stage balance and step times on the devices of this machine.

    python -m megatrain.bench [--config configs/NAME.yaml] [--set KEY=VALUE] [--device auto|cuda|cpu]
        [--figures train,loader,generation,scaling,parallel,stages] [--steps N] [--warmup N] [--json]
        [--gen-bytes N] [--gen-rounds R] [--generators cached,uncached,plain] [--plain-dim D] [--data DIR]
        [--layouts 1,pp2,tp2,dp2,pp2xtp2] [--memory-gib G]

Each figure is printed as soon as it is measured, one line each (with --json one JSON object,
its "figure" naming it), and every line names the device: a run cut short keeps what it had
measured. With --json the last line ("figure": "report") holds every figure in one object.
`--device cuda` fails at once, saying why, where torch sees no GPU.

Training ("train", after a "train_step" line per optimizer step) is the trainer's optimizer
step on random bytes: train.accumulation_steps(dp=1) micro-batches of micro_batch_size, each
loss divided by their number, gradients clipped to grad_clip, AdamW (fused on CUDA), bf16
autocast where train.precision is bf16, and the blocks' activations recomputed in the backward
pass where train.activation_checkpointing is set (train.checkpoint_blocks of them, as on one
pipeline stage). The model is built on the device itself (`build_model`): text-1b's
initialisation alone takes about a minute on a CPU.
MFU is model FLOPs (megatrain.parallel.cost: 6 * (N_global / P + N_local) plus attention, per
byte) times bytes/s over the device's matmul peak measured in the same run ("mfu"), and over
its datasheet's dense bf16 peak ("mfu_datasheet", bf16 runs on the devices of
megatrain.train.metrics.DATASHEET_BF16_TFLOPS).

Generation (the paper's Section 5.3 setting: 8,192 bytes by default) times greedy decoding
from an empty context with the cached decoder, with the whole model rerun for every byte,
and with a plain byte-level transformer that keeps a key/value cache and has as many
parameters in its transformer blocks. The loader is timed on `--data` (or on the standard
library's modules, sharded for the purpose) against `zstd -d` of the same bytes
(`megatrain.data.bench`). `scaling` is the cost per byte from 8K to 1M bytes of context.
`parallel` (`megatrain.bench_parallel`) runs `launch/pretrain.py` at each of --layouts:
each stage's layers, FLOPs share, estimated memory (weights and optimizer state, activations),
and the step time. `stages` gives the stages' estimates alone, at once, and with --memory-gib
G (a rank's device memory) the train.checkpoint_blocks list that auto would choose there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatrain.config import ConfigError, RunConfig, TrainConfig, load_config
from megatrain.model import Megabyte, MegabyteConfig, bytes_loss
from megatrain.model.decoding import PreallocatedKVCache, generate
from megatrain.model.layers import Block

# DeepSpeed (which these import) logs to the sys.stdout it finds when first imported: let that
# be stderr, so that stdout holds the figures alone.
with contextlib.redirect_stdout(sys.stderr):
    from megatrain.bench_parallel import ParallelLayout, parallel_figure, stages_figure
    from megatrain.parallel import Layout
    from megatrain.parallel.cost import model_flops_per_byte, recomputed_blocks
    from megatrain.train.memory import checkpoint_counts, device_memory_gib
    from megatrain.train.metrics import (datasheet_bf16_tflops, device_name, measure_matmul_tflops,
                                         peak_memory_bytes, synchronize)

REPO = Path(__file__).resolve().parents[1]
WARMUP_BYTES = 64  # untimed generation before the timed rounds
FIGURES = ("train", "loader", "generation", "scaling", "parallel", "stages")
GENERATORS = ("cached", "uncached", "plain")

Emit = Callable[[str, dict[str, Any]], None]


class NoGPUError(RuntimeError):
    """A GPU was asked for and torch sees none."""


def resolve_device(choice: str) -> torch.device:
    """"auto": the GPU when torch sees one, else the CPU; "cuda" insists on a GPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        build = (f"built for CUDA {torch.version.cuda}, {torch.cuda.device_count()} devices visible, "
                 f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
                 if torch.version.cuda else "a CPU-only build")
        raise NoGPUError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU ({build}); "
                         f"run on a GPU machine with a CUDA build of torch, or pass --device cpu")
    return torch.device(choice)


def precision_dtype(train: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if train.precision == "bf16" else torch.float32


def build_model(cfg: MegabyteConfig, device: torch.device, seed: int = 0) -> Megabyte:
    """Megabyte(cfg) with its parameters created and initialised on `device` (from `seed`, in
    that device's generator): the same initialisation code as on the CPU, with nothing to copy."""
    torch.manual_seed(seed)
    with torch.device(device):
        return Megabyte(cfg)


class Checkpointed(nn.Module):
    """A layer whose activations are recomputed in the backward pass instead of kept."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, state: Any) -> Any:
        return checkpoint(self.layer, state, use_reentrant=False)


def checkpoint_blocks(model: Megabyte, count: int | None = None) -> list[int]:
    """Activation checkpointing of `count` transformer blocks (all when None), those the
    trainer's pipeline would pick on one stage; returns their layer indices."""
    recomputed = recomputed_blocks(model.config, range(len(model.layers)), count)
    model.layers = nn.ModuleList(Checkpointed(m) if i in recomputed else m for i, m in enumerate(model.layers))
    return recomputed


def train_throughput(cfg: MegabyteConfig, train: TrainConfig, steps: int, device: torch.device, warmup: int = 2,
                     emit: Emit = lambda figure, values: None) -> dict[str, Any]:
    """Bytes/s of the trainer's optimizer step on random bytes, over `steps` steps after `warmup`
    untimed ones; a "train_step" line for every step as it ends."""
    dtype = precision_dtype(train)
    model = build_model(cfg, device).train()
    recomputed = checkpoint_blocks(model, train.checkpoint_blocks) if train.activation_checkpointing else []
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas, eps=train.eps,
                            weight_decay=train.weight_decay, fused=device.type == "cuda")
    accumulation = train.accumulation_steps(1)
    micro_batches = torch.randint(0, 256, (accumulation, train.micro_batch_size, cfg.seq_len), device=device)
    step_bytes = micro_batches.numel()

    def step() -> None:
        for x in micro_batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = bytes_loss(model(x), x) / accumulation
            loss.backward()
        if train.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed = 0.0
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)  # as the trainer waits for each step's loss
        seconds = time.perf_counter() - start
        timed += seconds if i >= warmup else 0.0
        emit("train_step", {"step": i + 1, "warmup": i < warmup, "step_s": seconds, "bytes_per_s": step_bytes / seconds})
    return {"micro_batch_size": train.micro_batch_size, "accumulation_steps": accumulation,
            "activation_checkpointing": train.activation_checkpointing, "recomputed_blocks": len(recomputed),
            "bytes_per_step": step_bytes,
            "timed_steps": steps, "step_s": timed / steps, "train_bytes_per_s": steps * step_bytes / timed,
            "params": sum(p.numel() for p in model.parameters())}


def one_stage(run: RunConfig, device: torch.device) -> TrainConfig:
    """run.train with the blocks one pipeline stage on `device` recomputes (auto resolved)."""
    if not run.train.activation_checkpointing:
        return run.train
    count, = checkpoint_counts(run, Layout(1, 1, 1), device_memory_gib(device))
    return replace(run.train, checkpoint_blocks=count)


def train_figure(cfg: MegabyteConfig, train: TrainConfig, steps: int, warmup: int, device: torch.device,
                 peak_tflops: float, datasheet_tflops: float | None, emit: Emit) -> dict[str, Any]:
    """The "train" figure: throughput, model TFLOP/s, MFU against both peaks, peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train_throughput(cfg, train, steps, device, warmup, emit)
    tflops = result["train_bytes_per_s"] * model_flops_per_byte(cfg) / 1e12
    result.update(model_tflops=tflops, mfu=tflops / peak_tflops, peak_memory_gib=peak_memory_bytes(device) / 2**30)
    if datasheet_tflops:
        result["mfu_datasheet"] = tflops / datasheet_tflops
    return result


class PlainTransformer(nn.Module):
    """A byte-level decoder-only transformer built from the same blocks, for comparison."""

    def __init__(self, dim: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, 4, 0.0, 1e-5) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    @torch.no_grad()
    def generate(self, n_bytes: int) -> bytes:
        """Greedy decoding of n_bytes with a key/value cache per layer, as MEGABYTE's global model keeps;
        each byte handed to the host as it is made, as `megatrain.model.decoding.generate` yields them."""
        caches = [PreallocatedKVCache(n_bytes) for _ in self.blocks]
        byte = torch.zeros(1, dtype=torch.long, device=self.head.weight.device)
        out = bytearray()
        for t in range(n_bytes):
            h = self.embed(byte) + self.pos.weight[t]
            for block, cache in zip(self.blocks, caches):
                h = block.step(h, cache)
            byte = self.head(self.norm(h)).argmax(-1)
            out.append(int(byte))
        return bytes(out)


def block_params(model: nn.Module) -> int:
    """Parameters inside transformer blocks, which every generated byte is computed through.

    Embeddings are left out: they are table look-ups, and at 8,192 bytes a plain
    transformer's position table alone would outweigh a small MEGABYTE.
    """
    return sum(p.numel() for m in model.modules() if isinstance(m, Block) for p in m.parameters())


def same_size_transformer(cfg: MegabyteConfig, n_block_params: int, dim: int) -> PlainTransformer:
    """As many blocks of width `dim` as hold n_block_params, with heads of the local model's size."""
    heads = max(1, dim // (cfg.local_dim // cfg.local_heads))
    with torch.device("meta"):  # only to count one block's parameters
        one_block = block_params(Block(dim, heads, 4, 0.0, 1e-5))
    return PlainTransformer(dim, max(1, round(n_block_params / one_block)), heads, cfg.seq_len)


def bytes_per_s(fn: Callable[[], None], n_bytes: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return n_bytes / (time.perf_counter() - start)


def generation_config(cfg: MegabyteConfig, n_bytes: int) -> MegabyteConfig:
    """cfg with a context of at least n_bytes (whole patches): the generation fills one window."""
    return replace(cfg, seq_len=max(cfg.seq_len, -(-n_bytes // cfg.patch_size) * cfg.patch_size))


def best_speeds(generators: dict[str, Callable[[int], object]], n_bytes: int, rounds: int, device: torch.device,
                emit: Emit = lambda figure, values: None) -> dict[str, float]:
    """Each generator's best bytes/s over `rounds` rounds that alternate between them; a
    "generation_round" line for each generator in each round as it ends.

    A short untimed run first takes each one's first-call set-up (about a second on CPU)
    out of the figures; alternating spreads a shared machine's load over all of them.
    """
    for fn in generators.values():
        fn(min(n_bytes, WARMUP_BYTES))
    best = dict.fromkeys(generators, 0.0)
    for r in range(rounds):
        for name, fn in generators.items():
            speed = bytes_per_s(lambda: fn(n_bytes), n_bytes, device)
            emit("generation_round", {"generator": name, "round": r + 1, "gen_bytes": n_bytes, "bytes_per_s": speed})
            best[name] = max(best[name], speed)
    return best


def generation_speed(cfg: MegabyteConfig, n_bytes: int, device: torch.device, dtype: torch.dtype,
                     rounds: int = 1, plain_dim: int = 0, generators: tuple[str, ...] = GENERATORS,
                     emit: Emit = lambda figure, values: None) -> dict[str, Any]:
    """Greedy generation of n_bytes from an empty context: MEGABYTE cached and uncached, and a
    plain transformer with as many block parameters (width plain_dim, default D_L)."""
    cfg = generation_config(cfg, n_bytes)
    model = build_model(cfg, device).to(dtype).eval()
    n_params = block_params(model)
    with torch.device(device):
        plain = same_size_transformer(cfg, n_params, plain_dim or cfg.local_dim).to(dtype).eval()

    def megabyte(use_cache: bool) -> Callable[[int], object]:
        return lambda n: deque(generate(model, b"", n, temperature=0, use_cache=use_cache), maxlen=0)

    every = {"cached": megabyte(True), "uncached": megabyte(False), "plain": plain.generate}
    speed = best_speeds({name: every[name] for name in generators}, n_bytes, rounds, device, emit)
    result: dict[str, Any] = {"gen_bytes": n_bytes, "gen_seq_len": cfg.seq_len, "gen_rounds": rounds,
                              "megabyte_block_params": n_params}
    if "cached" in speed:
        result["gen_cached_bytes_per_s"] = speed["cached"]
    if "uncached" in speed:
        result["gen_uncached_bytes_per_s"] = speed["uncached"]
    if "plain" in speed:
        result.update(plain_transformer_layers=len(plain.blocks), plain_transformer_dim=plain.head.in_features,
                      plain_transformer_block_params=block_params(plain), plain_transformer_bytes_per_s=speed["plain"])
    if {"cached", "uncached"} <= speed.keys():
        result["gen_cache_speedup"] = speed["cached"] / speed["uncached"]
    if {"cached", "plain"} <= speed.keys():
        result["gen_vs_plain_transformer"] = speed["cached"] / speed["plain"]
    return result


def scaling(device: torch.device, precision: str = "fp32", global_dim: int = 256,
            contexts: tuple[int, ...] = (8192, 32768, 131072, 524288, 1048576),
            emit: Emit = lambda figure, values: None) -> list[dict[str, Any]]:
    """Training cost per byte as the context grows, at P close to T^(1/3) (Section 3): one
    "scaling" line per context as it is measured.

    Widths stay fixed, so the change comes from attention: O(T^2 / P^2 + T * P).
    """
    rows = []
    train = TrainConfig(micro_batch_size=1, precision=precision)
    for seq_len in contexts:
        patch = 2 ** round(math.log2(seq_len ** (1 / 3)))
        cfg = MegabyteConfig(seq_len=seq_len, patch_size=patch, global_dim=global_dim, global_layers=2,
                             global_heads=global_dim // 64, local_dim=64, local_layers=2, local_heads=1,
                             dropout=0.0)
        speed = train_throughput(cfg, train, steps=1, device=device)["train_bytes_per_s"]
        rows.append({"seq_len": seq_len, "patch_size": patch, "bytes_per_s": speed,
                     "us_per_byte": 1e6 / speed, "model_flops_per_byte": model_flops_per_byte(cfg)})
        emit("scaling", rows[-1])
    return rows


def loader_speed(data: str | None, seq_len: int) -> dict[str, float]:
    """Loader bytes/s (one rank, `megatrain.data.bench`) over up to 64 MiB of `data`'s train
    split, or of shards of the standard library's modules built for the purpose."""
    from megatrain.data.bench import loader_benchmark

    with shards_or_standard_library(data) as data:
        report = loader_benchmark(data, seq_len, max_bytes=64 << 20, repeats=1)
    return {"loader_bytes_per_s": report["loader_bytes_per_s"], "loader_vs_zstd": report["ratio"]}


@contextlib.contextmanager
def shards_or_standard_library(data: str | None) -> Iterator[str]:
    """`data`, or shards of the standard library's modules (every machine has them) built
    into a temporary directory for as long as the context lasts."""
    if data is not None:
        yield data
        return
    from megatrain.demo import corpus_files

    with tempfile.TemporaryDirectory() as tmp:
        files = [str(f) for source in corpus_files().values() for f in source]
        subprocess.run([sys.executable, "-m", "data_prep.build_shards", *files, "--output", tmp],
                       cwd=REPO, check=True, capture_output=True)
        yield tmp


def parallel(config: str, run: RunConfig, overrides: tuple[str, ...], layouts: tuple[ParallelLayout, ...],
             data: str | None, steps: int, warmup: int, emit: Emit,
             memory_gib: float | None = None) -> list[dict[str, Any]]:
    """The "parallel" figure (`megatrain.bench_parallel`) on `data` or the standard library's shards."""
    with shards_or_standard_library(data) as data:
        return parallel_figure(config, run, overrides, list(layouts), data, steps, warmup, emit, memory_gib)


class Report:
    """Prints each figure the moment it is measured (flushed), every line with the device and
    config; keeps the figures for the closing "report" line."""

    def __init__(self, as_json: bool, **common: Any) -> None:
        self.as_json, self.common, self.figures = as_json, common, {}

    def emit(self, figure: str, values: dict[str, Any]) -> None:
        line = {"figure": figure, **self.common, **values}
        if figure in ("device", "train", "loader", "generation"):
            self.figures.update(values)
        if self.as_json:
            print(json.dumps(line), flush=True)
        else:
            fields = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items() if k != "figure")
            print(f"{figure:>16} | " + " | ".join(fields), flush=True)

    def close(self) -> None:
        if self.as_json:
            print(json.dumps({"figure": "report", **self.common, **self.figures}), flush=True)


def run_benchmark(config: str, device: torch.device, report: Report, figures: tuple[str, ...] = FIGURES[:3],
                  overrides: tuple[str, ...] = (), steps: int = 10, warmup: int = 2, gen_bytes: int = 8192,
                  gen_rounds: int = 1, generators: tuple[str, ...] = GENERATORS, plain_dim: int = 0,
                  data: str | None = None, layouts: tuple[ParallelLayout, ...] = (),
                  memory_gib: float | None = None) -> bool:
    """Measure `figures` on `device`, each reported as it is measured; False if one failed
    (out of memory: said in its line, and the others still run)."""
    run = load_config(config, overrides)
    cfg, train = run.model, run.train
    dtype = precision_dtype(train)
    peak = measure_matmul_tflops(device, dtype, seconds=1.0)
    datasheet = datasheet_bf16_tflops(report.common["device"]) if dtype == torch.bfloat16 else None
    report.emit("device", {"torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
                           "matmul_peak_tflops": peak, "datasheet_peak_tflops": datasheet})
    measures: dict[str, Callable[[], Any]] = {
        "train": lambda: train_figure(cfg, one_stage(run, device), steps, warmup, device, peak, datasheet,
                                      report.emit),
        "loader": lambda: loader_speed(data, cfg.seq_len),
        "generation": lambda: generation_speed(cfg, gen_bytes, device, dtype, gen_rounds, plain_dim, generators,
                                               report.emit),
        "scaling": lambda: scaling(device, train.precision, emit=report.emit),
        "parallel": lambda: parallel(config, run, overrides, layouts, data, steps, warmup, report.emit, memory_gib),
        "stages": lambda: stages_figure(run, list(layouts), memory_gib, report.emit),
    }
    ok = True
    for figure in figures:
        try:
            values = measures[figure]()
        except torch.cuda.OutOfMemoryError as e:
            ok = False
            report.emit(figure, {"error": "out of memory", "detail": str(e).splitlines()[0],
                                 "peak_memory_gib": peak_memory_bytes(device) / 2**30})
            continue  # its tensors are freed with the traceback; the allocator reuses their memory
        if figure not in ("scaling", "parallel", "stages"):  # their rows were reported one by one
            report.emit(figure, values)
    return ok


def names(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of some of `choices`."""

    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in chosen if name not in choices]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return chosen

    return parse


def layouts(text: str) -> tuple[ParallelLayout, ...]:
    """An argparse type: comma-separated layouts (`ParallelLayout.parse`)."""
    try:
        return tuple(ParallelLayout.parse(name.strip()) for name in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatrain.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config (default: configs/megabyte-text-1b.yaml on a GPU, "
                                         "configs/tiny.yaml on a CPU)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: the GPU if torch sees one; cuda: fail unless it does")
    parser.add_argument("--figures", type=names(FIGURES), default=FIGURES[:3],
                        help=f"what to measure, in order (default: {','.join(FIGURES[:3])}; "
                             "also: scaling, parallel, stages)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--gen-bytes", type=int, default=8192,
                        help="bytes to generate from an empty context (its seq_len grows to hold them)")
    parser.add_argument("--gen-rounds", type=int, default=1, help="timed generation rounds, the best kept")
    parser.add_argument("--generators", type=names(GENERATORS), default=GENERATORS,
                        help="what generates, alternating (default: cached,uncached,plain)")
    parser.add_argument("--plain-dim", type=int, default=0,
                        help="width of the same-size plain transformer (default: the local model's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.global_layers=2 (repeatable)")
    parser.add_argument("--data", default=None, help="shards to time the loader on (default: the standard "
                        "library's modules, sharded into a temporary directory)")
    parser.add_argument("--layouts", type=layouts, default=(ParallelLayout(), ParallelLayout(pp=2)),
                        help="the parallel figure's layouts, the first the speed-ups' base (default: 1,pp2; "
                             "e.g. 1,pp2,tp2,dp2,pp2xtp2)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="the parallel and stages figures: a rank's device memory; each stage's fewest "
                             "recomputed blocks to fit in 90%% of it (train.checkpoint_blocks: auto)")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.warmup < 0 or args.gen_bytes <= 0 or args.gen_rounds <= 0 or args.plain_dim < 0:
        parser.error("need --steps, --gen-bytes and --gen-rounds positive, --warmup and --plain-dim >= 0")
    if args.memory_gib is not None and args.memory_gib <= 0:
        parser.error(f"--memory-gib {args.memory_gib}: give the device's memory in GiB, more than 0")
    try:
        device = resolve_device(args.device)
    except NoGPUError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    config = args.config or str(REPO / "configs" / f"{'megabyte-text-1b' if device.type == 'cuda' else 'tiny'}.yaml")
    report = Report(args.json, device=device_name(device), config=config, overrides=list(args.set))
    try:
        ok = run_benchmark(config, device, report, args.figures, tuple(args.set), args.steps, args.warmup,
                           args.gen_bytes, args.gen_rounds, args.generators, args.plain_dim, args.data, args.layouts,
                           args.memory_gib)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    report.close()
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
