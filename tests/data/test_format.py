"""The format module: batch cutting, manifest validation and path safety."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from megatrain.data.format import FormatError, Manifest, ShardWriter, safe_relative_path
from tests.data.helpers import copy_dataset, edit_manifest


def test_batches_depend_only_on_the_document_sequence(tmp_path: Path) -> None:
    docs = [bytes([i]) * (i * 37 % 300) for i in range(200)]
    sources = [f"doc{i}" for i in range(200)]
    with ShardWriter(tmp_path / "one.arrow", 3, batch_bytes=1000) as one_by_one:
        for doc, source in zip(docs, sources):
            one_by_one.add([doc], [source])
    with ShardWriter(tmp_path / "chunks.arrow", 3, batch_bytes=1000) as in_chunks:
        for i in range(0, 200, 64):
            in_chunks.add(pa.array(docs[i : i + 64], pa.binary()), sources[i : i + 64])
    assert one_by_one.batches == in_chunks.batches
    assert (tmp_path / "one.arrow").read_bytes() == (tmp_path / "chunks.arrow").read_bytes()
    # A batch closes right after the document that brings it to 1000 bytes or more.
    sizes = [len(d) for d in docs]
    first_docs, first_bytes = one_by_one.batches[0]
    assert sum(sizes[: first_docs - 1]) < 1000 <= first_bytes == sum(sizes[:first_docs])


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.arrow", "a/../../b.arrow", "a\\b.arrow", "", "./x"])
def test_unsafe_shard_paths_are_rejected(name: str) -> None:
    with pytest.raises(FormatError, match="unsafe shard path"):
        safe_relative_path(name)


def test_manifest_round_trip_and_damage(dataset: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(dataset)
    assert manifest.split_shards("train") and manifest.split_shards("val")
    copy = copy_dataset(dataset, tmp_path)
    manifest.save(copy)
    assert Manifest.load(copy) == manifest

    def add_a_doc(raw: dict) -> None:
        raw["shards"][0]["docs"] += 1

    edit_manifest(copy, add_a_doc)
    with pytest.raises(FormatError, match="do not add up"):
        Manifest.load(copy)

    manifest.save(copy)
    edit_manifest(copy, lambda raw: raw["shards"].pop(0))  # the fingerprint no longer matches
    with pytest.raises(FormatError, match="fingerprint"):
        Manifest.load(copy)
