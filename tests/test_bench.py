import json
import subprocess
import sys


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


def test_scaling_rows():
    import torch

    from megatrain.bench import scaling

    rows = scaling(torch.device("cpu"), torch.float32, global_dim=128, contexts=(4096, 32768))
    assert [(r["seq_len"], r["patch_size"]) for r in rows] == [(4096, 16), (32768, 32)]
    assert all(r["us_per_byte"] > 0 and r["model_flops_per_byte"] > 0 for r in rows)
