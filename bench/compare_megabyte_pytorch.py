"""Training-step throughput of megatrain's MEGABYTE against MEGABYTE-pytorch 0.3.6.

    pip install megabyte-pytorch==0.3.6   # for this comparison only, never a dependency
    python bench/compare_megabyte_pytorch.py [--steps N] [--rounds R] [--json]

Same dimensions for both (global 512 wide x 4 layers, local 512 x 2, 8 heads of 64
in both stages, P = 8, T = 2048, batch 4): MEGABYTE-pytorch's `heads` is one setting
for every stage, so both stages are equally wide to compare like with like. Same loop (forward, loss, backward, AdamW step)
under bf16 autocast, on the same device. The two are timed in alternating rounds
so that load on the machine falls on both alike; the best round of each counts.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from megatrain.model import Megabyte, MegabyteConfig, StageBlock, bytes_loss

SEQ, PATCH, BATCH = 2048, 8, 4
GLOBAL_DIM, GLOBAL_LAYERS, LOCAL_DIM, LOCAL_LAYERS, HEADS, HEAD = 512, 4, 512, 2, 8, 64


def ours(compile_blocks: bool = False) -> tuple[torch.nn.Module, callable]:
    cfg = MegabyteConfig(seq_len=SEQ, patch_size=PATCH, global_dim=GLOBAL_DIM, global_layers=GLOBAL_LAYERS,
                         global_heads=HEADS, local_dim=LOCAL_DIM, local_layers=LOCAL_LAYERS,
                         local_heads=HEADS, dropout=0.0)
    model = Megabyte(cfg)
    if compile_blocks:  # as train.compile does
        for block in (m for m in model.layers if isinstance(m, StageBlock)):
            block.compile()
    return model, lambda x: bytes_loss(model(x), x)


def theirs() -> tuple[torch.nn.Module, callable]:
    try:
        from MEGABYTE_pytorch import MEGABYTE
    except ImportError:
        raise SystemExit("needs `pip install megabyte-pytorch==0.3.6` (and its beartype, einops)") from None
    model = MEGABYTE(num_tokens=256, dim=(GLOBAL_DIM, LOCAL_DIM), depth=(GLOBAL_LAYERS, LOCAL_LAYERS),
                     max_seq_len=(SEQ // PATCH, PATCH), dim_head=HEAD, heads=HEADS, flash_attn=True)
    return model, lambda x: model(x, return_loss=True)


def timer(build, device: torch.device, steps: int):
    """A function that times `steps` training steps of the built model, in bytes/s."""
    torch.manual_seed(0)
    model, loss_fn = build()
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (BATCH, SEQ), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up

    def measure() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * BATCH * SEQ / (time.perf_counter() - start)

    return measure, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time megatrain with train.compile's blocks")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    builds = [("megatrain", ours), ("megabyte_pytorch", theirs)]
    if args.compile:
        builds.insert(1, ("megatrain_compiled", lambda: ours(compile_blocks=True)))
    runs = {name: timer(build, device, args.steps) for name, build in builds}
    best = {name: 0.0 for name in runs}
    for _ in range(args.rounds):
        for name, (measure, _) in runs.items():
            best[name] = max(best[name], measure())
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        **{f"{name}_bytes_per_s": speed for name, speed in best.items()},
        **{f"{name}_params": params for name, (_, params) in runs.items()},
        "speedup": best["megatrain"] / best["megabyte_pytorch"],
        **({"compiled_speedup": best["megatrain_compiled"] / best["megabyte_pytorch"]} if args.compile else {}),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:>28}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
