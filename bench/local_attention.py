"""Causal attention over a few positions: SDPA against a batched matmul + masked softmax.

    python bench/local_attention.py [--dtype bf16|fp32] [--patch 4 8 16 ...] [--rounds R]

The local model attends over P positions with B * K patches as the batch. At text-1b's
local shape (6,144 patches x 16 heads x P = 8 x 64) this times forward + backward of
`F.scaled_dot_product_attention(is_causal=True)` and of `megatrain.model.layers.small_attention`,
keeping B * K * P fixed as P changes, on CUDA when present (else CPU). One JSON line per
patch length, printed as soon as it is measured; rounds alternate, the best of each counts.
The model switches to the matmul below `layers.SMALL_ATTENTION_MAX` positions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from megatrain.model.layers import small_attention

POSITIONS, HEADS, HEAD_DIM = 6144 * 8, 16, 64  # text-1b's local model: 6,144 patches of 8


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def matmul(q, k, v):
    m = q.shape[-2]
    return small_attention(q, k, v, torch.ones(m, m, dtype=torch.bool, device=q.device).tril())


def seconds(attend, q, k, v, grad, device: torch.device) -> float:
    """Wall time of one forward + backward."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    q.grad = k.grad = v.grad = None
    attend(q, k, v).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--patch", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--positions", type=int, default=POSITIONS, help="B * K * P, fixed as P changes")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    for P in args.patch:
        shape = (args.positions // P, HEADS, P, HEAD_DIM)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=dtype)
        best = {"sdpa": float("inf"), "matmul": float("inf")}
        for attend in (sdpa, matmul):  # warm-up
            seconds(attend, q, k, v, grad, device)
        for _ in range(args.rounds):
            for label, attend in (("sdpa", sdpa), ("matmul", matmul)):
                best[label] = min(best[label], seconds(attend, q, k, v, grad, device))
        print(json.dumps({"device": name, "threads": torch.get_num_threads(), "dtype": args.dtype,
                          "shape": list(shape), "sdpa_ms": round(best["sdpa"] * 1e3, 2),
                          "matmul_ms": round(best["matmul"] * 1e3, 2),
                          "matmul_speedup": round(best["sdpa"] / best["matmul"], 2)}), flush=True)


if __name__ == "__main__":
    main()
