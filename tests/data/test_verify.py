"""data_prep.verify: a good dataset passes; each kind of damage is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.helpers import copy_dataset, edit_manifest, shard_files

REPO = Path(__file__).resolve().parents[2]


def verify(data_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "data_prep.verify", str(data_dir)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def test_good_dataset_passes(dataset: Path) -> None:
    result = verify(dataset)
    assert result.returncode == 0, result.stderr
    assert "0 bad" in result.stdout


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_each_damaged_shard_is_named(dataset: Path, tmp_path: Path, damage) -> None:
    copy = copy_dataset(dataset, tmp_path)
    shards = shard_files(copy)
    for name in (shards[0], shards[-1]):
        damage(copy / name)
    result = verify(copy)
    assert result.returncode == 1
    bad = [line for line in result.stderr.splitlines() if line.startswith("BAD")]
    assert [line.split()[1].rstrip(":") for line in bad] == [shards[0], shards[-1]]
    assert "sha256" in bad[0] and "2 bad" in result.stderr


def test_manifest_pointing_outside_the_directory_fails(dataset: Path, tmp_path: Path) -> None:
    copy = copy_dataset(dataset, tmp_path)
    edit_manifest(copy, lambda raw: raw["shards"][0].update(file="../../etc/passwd"))
    result = verify(copy)
    assert result.returncode == 1 and "unsafe shard path '../../etc/passwd'" in result.stderr
