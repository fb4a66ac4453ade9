"""`make demo`'s driver end to end, shortened to a few steps."""

import subprocess
import sys

import pytest


@pytest.mark.timeout(1200)  # every stage of the demo, each a process of its own
def test_demo_runs_every_stage_and_reports(cpu_comm, tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "megatrain.demo", "--run-dir", str(run_dir), "--steps", "3",
                             "--eval-bytes", "8192"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("validation bits/byte: modules", "validation bits/byte: packages", "validation bits/byte",
                 "training bytes/s", "--- sample"):
        assert line in result.stdout
    for name in ("model.pt", "metrics.jsonl", "sample.txt", "loss.png", "pretrain.log"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 3
