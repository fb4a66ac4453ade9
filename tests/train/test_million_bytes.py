"""One training step at megabyte-1m's length, 1,048,576 bytes, under DeepSpeed (one rank,
activation checkpointing, widths cut down so that it takes seconds on a CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatrain.config import load_config
from megatrain.data import ByteStream
from megatrain.model import bytes_loss
from megatrain.parallel import reference_model

from ..distributed import REPO, launch

MILLION = REPO / "configs" / "megabyte-1m.yaml"
# K = 8,192 patches of 128 bytes as in the config; D_G = 1, one narrow block per stage
NARROW = ("model.global_dim=128", "model.global_layers=1", "model.global_heads=1",
          "model.local_dim=16", "model.local_layers=1", "model.local_heads=1",
          "model.dropout=0.0", "train.precision=fp32", "train.grad_accum_steps=1",
          "train.eval_interval=0")


@pytest.fixture(scope="module")
def megabyte_shards(tmp_path_factory) -> Path:
    """A train split of some 1.3 MB (the standard library's unittest and email packages): room
    for one sample of a million bytes."""
    stdlib = Path(json.__file__).parents[1]
    out = tmp_path_factory.mktemp("megabyte_shards")
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", str(stdlib / "unittest"), str(stdlib / "email"),
                    "--output", str(out)], cwd=REPO, check=True, capture_output=True)
    return out


def test_one_step_on_a_million_bytes(megabyte_shards, cpu_comm, tmp_path):
    cfg = load_config(MILLION, overrides=NARROW)
    assert cfg.model.seq_len == 2**20 and cfg.train.activation_checkpointing
    args = ["--config", str(MILLION), "--data", str(megabyte_shards), "--train-steps", "1",
            "--metrics", str(tmp_path / "metrics.jsonl"),
            *[a for o in NARROW for a in ("--set", o)]]
    job = launch("python", 1, args, tmp_path, timeout=540)
    assert job.returncode == 0, job.output[-5000:]
    (step,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"])
    # the same million bytes through the plain PyTorch model with the same initial weights
    first = next(ByteStream(megabyte_shards, "train", cfg.model.seq_len, global_batch_size=1, micro_batch_size=1,
                            seed=cfg.train.seed)).long()
    assert first.shape == (1, 2**20)
    with torch.no_grad():
        expected = bytes_loss(reference_model(cfg.model, cfg.train.seed)(first), first).item()
    assert step["loss"] == pytest.approx(expected, rel=1e-5)
