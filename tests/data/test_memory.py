"""A stream of 1 MiB samples over a corpus larger than the loader's memory bound."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from megatrain.data import ByteStream
from tests.data.helpers import build

MIB = 1 << 20


def anonymous_rss() -> int:
    """Private memory of this process (mapped shard files do not count)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


def test_million_byte_samples_stream_with_bounded_memory(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):  # 96 MiB of low-entropy bytes: quick to compress, real to decode
        (corpus / f"blob{i:02d}.bin").write_bytes(rng.integers(97, 101, 2 * MIB, dtype=np.uint8).tobytes())
    assert build([corpus], tmp_path / "shards", "--shard-bytes", str(32 * MIB), "--zstd-level", "1") == 0

    options = {"block_bytes": 4 * MIB, "group_blocks": 2, "prefetch": 2, "workers": 1}
    with ByteStream(tmp_path / "shards", "train", MIB, 2, 1, **options) as loader:
        assert loader.num_samples == 96
        baseline = anonymous_rss()
        peak = 0
        for _ in range(loader.num_samples + 20):  # an epoch and then some
            batch = next(loader)
            assert batch.shape == (1, MIB)
            peak = max(peak, anonymous_rss() - baseline)
    # A group is 8 MiB. Held: the current group, `workers` read ahead, up to two idle
    # buffers, a few decoded 2 MiB record batches and the prefetched micro-batches.
    assert peak < 48 * MIB, f"memory grew by {peak / MIB:.0f} MiB while streaming a 96 MiB corpus"
