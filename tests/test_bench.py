import json
import subprocess
import sys

import torch

from megatrain.bench import PlainTransformer, block_params, generation_speed, scaling
from megatrain.model import MegabyteConfig


def test_bench_json_reports_every_figure():
    result = subprocess.run([sys.executable, "-m", "megatrain.bench", "--json", "--steps", "2", "--gen-bytes", "64",
                             "--set", "model.local_layers=1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("train_bytes_per_s", "mfu", "matmul_peak_tflops", "peak_memory_gib",
                "gen_cached_bytes_per_s", "gen_uncached_bytes_per_s", "plain_transformer_bytes_per_s"):
        assert report[key] > 0, key
    assert 0 < report["mfu"] < 1
    assert report["overrides"] == ["model.local_layers=1"]
    assert report["gen_bytes"] == 64 and report["gen_seq_len"] == 256  # tiny's own context holds them


def test_generation_past_the_config_context_against_a_same_size_transformer():
    cfg = MegabyteConfig(seq_len=64, patch_size=4, global_dim=64, global_layers=2, global_heads=2,
                         local_dim=16, local_layers=1, local_heads=2, dropout=0.0)
    report = generation_speed(cfg, 101, torch.device("cpu"), torch.float32, rounds=2, plain_dim=32)
    assert report["gen_seq_len"] == 104  # whole patches holding all 101 bytes
    assert report["plain_transformer_dim"] == 32
    one_block = block_params(PlainTransformer(32, 1, 2, 8))
    assert abs(report["plain_transformer_block_params"] - report["megabyte_block_params"]) <= one_block / 2
    assert report["gen_cache_speedup"] > 0 and report["gen_vs_plain_transformer"] > 0


def test_scaling_rows():
    rows = scaling(torch.device("cpu"), torch.float32, global_dim=128, contexts=(4096, 32768))
    assert [(r["seq_len"], r["patch_size"]) for r in rows] == [(4096, 16), (32768, 32)]
    assert all(r["us_per_byte"] > 0 and r["model_flops_per_byte"] > 0 for r in rows)
