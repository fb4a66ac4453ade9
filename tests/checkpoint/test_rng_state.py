"""A rank's RNG state as checkpoints save it: every generator back as it was, and the
files of older checkpoints (no device generators, the local model's stream alone) still load."""

from __future__ import annotations

import random

import numpy as np
import torch

from megatrain.parallel import rank_stream_state, seed_rank_stream
from megatrain.train.checkpointing import rng_state, set_rng_state


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_every_stream_is_restored(tmp_path):
    seed_rank_stream(3, tp_rank=1)
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = draws(), rank_stream_state()["model-parallel-rng"]
    seed_rank_stream(4, tp_rank=0)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    got = draws(), rank_stream_state()["model-parallel-rng"]
    assert got[0][:2] == expected[0][:2] and torch.equal(got[0][2], expected[0][2])
    assert torch.equal(got[1], expected[1])


def test_a_checkpoint_from_before_the_rank_stream_loads_its_local_stream():
    seed_rank_stream(3, tp_rank=1)
    local = rank_stream_state()["model-parallel-rng"]
    old = {k: v for k, v in rng_state().items() if k not in ("devices", "rank_stream")}
    seed_rank_stream(4, tp_rank=0)
    set_rng_state({**old, "local_stream": local})
    assert torch.equal(rank_stream_state()["model-parallel-rng"], local)
    set_rng_state({**old, "local_stream": None})  # an old file of tp = 1, or of a stage without the local model
    assert torch.equal(rank_stream_state()["model-parallel-rng"], local)
