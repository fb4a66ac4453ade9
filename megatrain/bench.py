"""Single-device benchmark: training throughput, MFU, peak memory, generation speed.

    python -m megatrain.bench [--config configs/NAME.yaml] [--json] [--steps N] [--gen-bytes N]

MFU is model FLOPs (megatrain.parallel.cost: 6 * (N_global / P + N_local) plus
attention, per byte) times bytes/s, over the device's matmul peak measured in the
same run. Generation compares the cached decoder with rerunning the whole model per
byte, and with a plain byte-level transformer of the same parameter count that keeps
a key/value cache (the paper's Section 5.3 comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from megatrain.config import load_config
from megatrain.generate import generate
from megatrain.model import Megabyte, MegabyteConfig, bytes_loss
from megatrain.model.layers import Block, KVCache
from megatrain.parallel.cost import model_flops_per_byte
from megatrain.train.metrics import measure_matmul_tflops

REPO = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's RSS high-water


def train_throughput(cfg: MegabyteConfig, batch_size: int, steps: int, device: torch.device,
                     dtype: torch.dtype) -> float:
    """Bytes/s of forward + backward + AdamW steps on random bytes (warm-up excluded)."""
    torch.manual_seed(0)
    model = Megabyte(cfg).to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=fused)
    x = torch.randint(0, 256, (batch_size, cfg.seq_len), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = bytes_loss(model(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch_size * cfg.seq_len / (time.perf_counter() - start)


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
    def generate(self, n_bytes: int) -> None:
        """Greedy decoding of n_bytes with a key/value cache per layer."""
        caches = [KVCache() for _ in self.blocks]
        byte = torch.zeros(1, dtype=torch.long, device=self.head.weight.device)
        for t in range(n_bytes):
            h = self.embed(byte) + self.pos.weight[t]
            for block, cache in zip(self.blocks, caches):
                h = block.step(h, cache)
            byte = self.head(self.norm(h)).argmax(-1)


def same_size_transformer(cfg: MegabyteConfig, n_params: int) -> PlainTransformer:
    """As many blocks of the local model's width as make n_params (12 d^2 per block)."""
    layers = max(1, round(n_params / (12 * cfg.local_dim**2)))
    return PlainTransformer(cfg.local_dim, layers, cfg.local_heads, cfg.seq_len)


def bytes_per_s(fn, n_bytes: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return n_bytes / (time.perf_counter() - start)


def generation_speed(cfg: MegabyteConfig, n_bytes: int, device: torch.device,
                     dtype: torch.dtype) -> dict:
    model = Megabyte(cfg).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    plain = same_size_transformer(cfg, n_params).to(device=device, dtype=dtype).eval()

    def run(use_cache: bool) -> None:
        for _ in generate(model, b"\n", n_bytes, temperature=0, use_cache=use_cache):
            pass

    cached = bytes_per_s(lambda: run(True), n_bytes, device)
    uncached = bytes_per_s(lambda: run(False), n_bytes, device)
    plain_speed = bytes_per_s(lambda: plain.generate(n_bytes), n_bytes, device)
    return {"gen_bytes": n_bytes, "gen_cached_bytes_per_s": cached, "gen_uncached_bytes_per_s": uncached,
            "gen_cache_speedup": cached / uncached, "plain_transformer_params": sum(p.numel() for p in plain.parameters()),
            "plain_transformer_bytes_per_s": plain_speed, "gen_vs_plain_transformer": cached / plain_speed}


def scaling(device: torch.device, dtype: torch.dtype, global_dim: int = 256,
            contexts: tuple[int, ...] = (8192, 32768, 131072, 524288, 1048576)) -> list[dict]:
    """Training cost per byte as the context grows, at P close to T^(1/3) (Section 3).

    Widths stay fixed, so the change comes from attention: O(T^2 / P^2 + T * P).
    """
    rows = []
    for seq_len in contexts:
        patch = 2 ** round(math.log2(seq_len ** (1 / 3)))
        cfg = MegabyteConfig(seq_len=seq_len, patch_size=patch, global_dim=global_dim, global_layers=2,
                             global_heads=global_dim // 64, local_dim=64, local_layers=2, local_heads=1,
                             dropout=0.0)
        speed = train_throughput(cfg, batch_size=1, steps=1, device=device, dtype=dtype)
        rows.append({"seq_len": seq_len, "patch_size": patch, "bytes_per_s": speed,
                     "us_per_byte": 1e6 / speed, "model_flops_per_byte": model_flops_per_byte(cfg)})
    return rows


def run_benchmark(config: str, steps: int, gen_bytes: int, overrides: tuple[str, ...] = ()) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run = load_config(config, overrides)
    cfg, train_cfg = run.model, run.train
    peak = measure_matmul_tflops(device, dtype, seconds=1.0)
    throughput = train_throughput(cfg, train_cfg.micro_batch_size, steps, device, dtype)
    tflops = throughput * model_flops_per_byte(cfg) / 1e12
    result = {
        "config": config, "overrides": list(overrides), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "micro_batch_size": train_cfg.micro_batch_size,
        "train_bytes_per_s": throughput, "model_tflops": tflops, "matmul_peak_tflops": peak,
        "mfu": tflops / peak, "peak_memory_gib": peak_memory_bytes(device) / 2**30,
    }
    result.update(generation_speed(cfg, min(gen_bytes, cfg.seq_len), device, dtype))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatrain.bench", description=__doc__.split("\n")[0])
    default = "megabyte-text-1b" if torch.cuda.is_available() else "tiny"
    parser.add_argument("--config", default=str(REPO / "configs" / f"{default}.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--gen-bytes", type=int, default=8192, help="bytes to generate (at most seq_len)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.global_layers=2 (repeatable)")
    parser.add_argument("--scaling", action="store_true",
                        help="also measure the cost per byte from 8K to 1M bytes of context")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run_benchmark(args.config, args.steps, args.gen_bytes, tuple(args.set))
    if args.scaling:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        result["scaling"] = scaling(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key == "scaling":
                for row in value:
                    print(f"{'scaling':>32}: T={row['seq_len']:>8,} P={row['patch_size']:>3} "
                          f"{row['us_per_byte']:8.2f} us/byte {row['model_flops_per_byte'] / 1e6:8.2f} MFLOP/byte")
            else:
                print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
