import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatrain.bench import PlainTransformer, block_params, scaling



def test_bench_json_reports_every_figure():
    # One intra-op thread: batch-1 decoding gains nothing from two, and loses much on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "megatrain.bench", "--json", "--steps", "2", "--gen-bytes", "300",
                             "--gen-rounds", "2", "--plain-dim", "64", "--set", "model.local_layers=1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("train_bytes_per_s", "mfu", "matmul_peak_tflops", "peak_memory_gib", "gen_cached_bytes_per_s",
                "gen_uncached_bytes_per_s", "gen_cache_speedup", "plain_transformer_bytes_per_s",
                "gen_vs_plain_transformer", "loader_bytes_per_s", "loader_vs_zstd"):
        assert report[key] > 0, key
    assert 0 < report["mfu"] < 1
    assert report["overrides"] == ["model.local_layers=1"]
    assert report["gen_bytes"] == 300 and report["gen_seq_len"] == 304  # tiny's 256 grown to whole patches
    assert report["gen_rounds"] == 2 and report["plain_transformer_dim"] == 64
    one_block = block_params(PlainTransformer(64, 1, 2, 8))
    assert abs(report["plain_transformer_block_params"] - report["megabyte_block_params"]) <= one_block / 2


def test_scaling_rows():
    rows = scaling(torch.device("cpu"), torch.float32, global_dim=128, contexts=(4096, 32768))
    assert [(r["seq_len"], r["patch_size"]) for r in rows] == [(4096, 16), (32768, 32)]
    assert all(r["us_per_byte"] > 0 and r["model_flops_per_byte"] > 0 for r in rows)


def test_gpu_check_script_runs_and_keeps_every_result(tmp_path, cpu_comm):
    """bench/gpu_check.sh, the one prepared run for a GPU machine, here on CPU with tiny configs."""
    repo = Path(__file__).resolve().parents[1]
    tiny = str(repo / "configs" / "tiny.yaml")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "BENCH_CONFIG": tiny, "LONG_CONFIG": tiny,
           "GEN_BYTES": "64", "STEPS": "2"}
    result = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["config"] == tiny and bench["gen_bytes"] == 64 and bench["train_bytes_per_s"] > 0
    steps = [json.loads(line) for line in (tmp_path / "1m.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["peak_memory_gib"] > 0 and s["mfu"] > 0 for s in steps)
