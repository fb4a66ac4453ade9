"""Check a dataset directory: every shard's sha256, decoding and counts against manifest.json.

    python -m data_prep.verify DIR

Prints one line per shard and exits non-zero if the manifest or any shard is bad.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from megatrain.data.format import CorruptShardError, FormatError, Manifest, ShardInfo, open_shard, read_batch, sha256_file


def shard_problem(data_dir: Path, shard: ShardInfo) -> str | None:
    """Why `shard` does not match its manifest entry, or None if it does."""
    path = data_dir / shard.file
    if not path.is_file():
        return "missing"
    digest = sha256_file(path)
    if digest != shard.sha256:
        return f"sha256 {digest} differs from the manifest's {shard.sha256}"
    try:
        reader = open_shard(path)
        if reader.num_record_batches != len(shard.batches):
            return f"{reader.num_record_batches} record batches, manifest says {len(shard.batches)}"
        for index, (docs, nbytes) in enumerate(shard.batches):
            read_batch(reader, path, index, docs, nbytes)
            if reader.get_batch(index).column("source").null_count:
                return f"record batch {index} has null sources"
    except CorruptShardError as e:
        return str(e)
    return None


def verify(data_dir: Path | str) -> list[str]:
    """One line per shard ("ok FILE" or "BAD FILE: why"); a bad manifest gives a single BAD line."""
    data_dir = Path(data_dir)
    try:
        manifest = Manifest.load(data_dir)
    except FormatError as e:
        return [f"BAD manifest.json: {e}"]
    lines = []
    for shard in manifest.shards:
        problem = shard_problem(data_dir, shard)
        lines.append(f"ok {shard.file}" if problem is None else f"BAD {shard.file}: {problem}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path, metavar="DIR")
    args = p.parse_args(argv)
    lines = verify(args.data_dir)
    bad = [line for line in lines if line.startswith("BAD")]
    for line in lines:
        print(line, file=sys.stderr if line.startswith("BAD") else sys.stdout)
    print(f"verify: {len(lines) - len(bad)} ok, {len(bad)} bad", file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
