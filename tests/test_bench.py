import json
import subprocess
import sys


def test_bench_json_reports_every_figure():
    result = subprocess.run([sys.executable, "-m", "megatrain.bench", "--json", "--steps", "2", "--gen-bytes", "64"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("train_bytes_per_s", "mfu", "matmul_peak_tflops", "peak_memory_gib",
                "gen_cached_bytes_per_s", "gen_uncached_bytes_per_s", "plain_transformer_bytes_per_s"):
        assert report[key] > 0, key
    assert 0 < report["mfu"] < 1
