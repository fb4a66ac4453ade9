"""Each layer's measured forward + backward time beside its share of the FLOPs, and what
every two-stage cut of the layer list allows.

    python bench/layer_times.py [--config configs/tiny.yaml] [--set model.global_dim=512 ...] [--rounds R]

The pipeline partition ("flops") balances stages by `megatrain.parallel.layer_costs`; this
says whether time follows those FLOPs on this device (one thread on CPU), layer by layer,
for one micro-batch of one sequence of the config. For each cut into two stages (at whole
layers) it prints stage 0's share of the time and the speed-up over one rank that a
pipeline of 2 stages with m = 8 micro-batches could reach if nothing but the work counted:
the slower stage works m times, the faster one once more while the pipeline fills and
drains, so m / (m x max share + min share).
"""

from __future__ import annotations

import argparse
import time

import torch

from megatrain.config import load_config
from megatrain.model import Megabyte
from megatrain.parallel import layer_costs, pipeline_cut

MICRO_BATCHES = 8


def with_fresh_leaves(state):
    """The layer's input as new leaves (floating tensors requiring gradients)."""
    if isinstance(state, tuple):
        return tuple(t.detach().requires_grad_(t.is_floating_point()) for t in state)
    return state.detach()


def layer_seconds(model: Megabyte, x: torch.Tensor, rounds: int) -> list[float]:
    """The best of `rounds` timed forward + backward passes of each layer (after one untimed)."""
    inputs, state = [], x
    with torch.no_grad():
        for layer in model.layers:
            inputs.append(state)
            state = layer(state)
    seconds = []
    for layer, state in zip(model.layers, inputs):
        best = float("inf")
        for round_ in range(rounds + 1):
            leaves = with_fresh_leaves(state)
            start = time.perf_counter()
            out = layer(leaves)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))
            if round_:
                best = min(best, time.perf_counter() - start)
        seconds.append(best)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set).model
    torch.manual_seed(0)
    model = Megabyte(cfg).train()
    seconds = layer_seconds(model, torch.randint(0, 256, (1, cfg.seq_len)), args.rounds)
    flops = [c.flops_per_byte for c in layer_costs(cfg)]
    for i, (layer, f, s) in enumerate(zip(model.layers, flops, seconds)):
        print(f"{i:2d} {type(layer).__name__:15s} FLOPs {f / sum(flops):6.1%}  time {s / sum(seconds):6.1%}"
              f"  {s * 1e3:7.1f} ms")
    print(f"a step of one sequence: {sum(seconds):.3f} s; the flops partition at pp=2: "
          f"{pipeline_cut(cfg, 'flops', 2)}")
    for cut in range(1, len(seconds)):
        share = sum(seconds[:cut]) / sum(seconds)
        bound = MICRO_BATCHES / (MICRO_BATCHES * max(share, 1 - share) + min(share, 1 - share))
        print(f"cut before layer {cut:2d}: stage 0 {share:6.1%} of the time, pp=2 at most {bound:.2f}x")


if __name__ == "__main__":
    main()
