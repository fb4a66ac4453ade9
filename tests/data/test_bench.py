"""The loader benchmark runs and reports against a named baseline."""

from __future__ import annotations

from pathlib import Path

from megatrain.data.bench import loader_benchmark


def test_loader_benchmark_reports_both_rates(dataset: Path) -> None:
    result = loader_benchmark(dataset, 4096, micro_batch_size=8, repeats=1, block_bytes=16384)
    assert result["bytes"] == result["bytes"] // (8 * 4096) * 8 * 4096 > 0
    assert result["loader_bytes_per_s"] > 0 and result["baseline_bytes_per_s"] > 0
    assert result["baseline"].startswith(("zstd -d", "zstandard"))
