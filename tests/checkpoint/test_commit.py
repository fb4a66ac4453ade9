"""Committing a checkpoint on a filesystem that runs out of room for `latest` itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatrain.checkpoint import commit, damaged_files, partial_tag

from ..distributed import tmpfs


def write_partial(save_dir: Path, step: int) -> None:
    partial = save_dir / partial_tag(step)
    partial.mkdir()
    (partial / "model_states.pt").write_bytes(b"weights")


@pytest.fixture
def tiny_disk(tmp_path: Path):
    with tmpfs(tmp_path, "1m") as disk:
        yield disk


def test_a_failed_write_of_latest_keeps_the_old_one_and_leaves_no_temporary_file(tiny_disk):
    save_dir = tiny_disk
    write_partial(save_dir, 1)
    commit(save_dir, 1)
    write_partial(save_dir, 2)
    disk = os.statvfs(save_dir)
    (save_dir / "filler").write_bytes(bytes((disk.f_bavail - 1) * disk.f_bsize))
    # the last block takes global_step2's checksums; latest.tmp is created and cannot be written
    with pytest.raises(OSError, match="No space left"):
        commit(save_dir, 2)
    assert (save_dir / "latest").read_text() == "global_step1"
    assert not (save_dir / "latest.tmp").exists()
    assert damaged_files(save_dir / "global_step2") == []  # complete, though `latest` does not name it
