"""build_shards in one process: every input format byte-exact, determinism, bad inputs."""

from __future__ import annotations

import gzip
import io
import json
import random
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from PIL import Image

from data_prep.stages import choose_split
from tests.data.helpers import build, dataset_files, shard_docs, write_text_corpus


def write_text_inputs(root: Path) -> dict[str, bytes]:
    """One input of every text-modality format; returns the documents expected, by source."""
    rng = random.Random(1)
    raw = rng.randbytes(3000) + b"\x00\xff"
    texts = ["plain line", "ünïcødé ✓ 字节", "", "tabs\tand\nnewlines"]
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    (root / "raw.bin").write_bytes(raw)
    (root / "notes.txt").write_bytes("a .txt file is one document\n".encode())
    frames = [zstandard.ZstdCompressor().compress(part) for part in (lines[:30], lines[30:])]
    (root / "docs.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as pzstd writes
    (root / "docs.jsonl").write_bytes(lines)
    (root / "packed.bin.gz").write_bytes(gzip.compress(raw[::-1]))
    (root / "empty.dat").write_bytes(b"")
    pq.write_table(pa.table({"text": texts[:2], "other": [1, 2]}), root / "table.parquet")
    expected = {
        "in/raw.bin": raw,
        "in/notes.txt": "a .txt file is one document\n".encode(),
        "in/packed.bin.gz": raw[::-1],
        "in/empty.dat": b"",
        "in/table.parquet[0]": texts[0].encode(),
        "in/table.parquet[1]": texts[1].encode(),
    }
    for name in ("docs.jsonl.zst", "docs.jsonl"):
        expected |= {f"in/{name}:{i + 1}": t.encode() for i, t in enumerate(texts)}
    return expected


def test_every_text_format_round_trips_byte_exact(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    expected = write_text_inputs(tmp_path / "in")
    assert build([tmp_path / "in"], tmp_path / "out", "--batch-bytes", "1000") == 0
    assert dict(shard_docs(tmp_path / "out")) == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == 0
    assert all(s["split"] == "train" for s in manifest["shards"])


def patch_scan_by_hand(pixels: np.ndarray, side: int) -> bytes:
    height, width, _ = pixels.shape
    return bytes(
        pixels[by * side + y, bx * side + x, c]
        for by in range(height // side)
        for bx in range(width // side)
        for y in range(side)
        for x in range(side)
        for c in range(3)
    )


def test_images_become_rgb_bytes_in_patch_scan_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    png, npy = (rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2))
    big = rng.integers(0, 256, (32, 24, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(png).save(tmp_path / "in" / "a.png")
    Image.fromarray(big).save(tmp_path / "in" / "b.png")
    np.save(tmp_path / "in" / "c.npy", npy)
    (tmp_path / "in" / "d.png").write_bytes(b"\x89PNG not really")
    options = ("--modality", "image", "--image-size", "8", "--patch-size", "12")
    assert build([tmp_path / "in"], tmp_path / "out", *options) == 0
    docs = dict(shard_docs(tmp_path / "out"))
    assert docs["in/a.png"] == patch_scan_by_hand(png, 2)
    assert docs["in/c.npy"] == patch_scan_by_hand(npy, 2)
    resized = np.asarray(Image.fromarray(big).resize((8, 8), Image.Resampling.BOX))
    assert docs["in/b.png"] == patch_scan_by_hand(resized, 2)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == 1 and manifest["skipped_examples"][0]["source"] == "in/d.png"


def test_wav_files_become_their_pcm_bytes(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(-(2**15), 2**15, 4000, dtype=np.int16).tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(frames)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "tone.wav").write_bytes(buffer.getvalue())
    assert build([tmp_path / "in"], tmp_path / "out", "--modality", "audio") == 0
    assert dict(shard_docs(tmp_path / "out")) == {"in/tone.wav": frames}


def test_rebuilds_and_worker_counts_give_identical_datasets(tmp_path: Path) -> None:
    corpus = write_text_corpus(tmp_path, files=30, mean_bytes=4000)
    options = ("--shard-bytes", "20000", "--batch-bytes", "3000", "--val-fraction", "0.3")
    for name, workers in (("a", "1"), ("b", "1"), ("c", "2")):
        assert build([corpus], tmp_path / name, *options, "--workers", workers) == 0
    reference = dataset_files(tmp_path / "a")
    assert len([n for n in reference if n.startswith("train-")]) > 3
    assert dataset_files(tmp_path / "b") == reference
    assert dataset_files(tmp_path / "c") == reference


def test_split_is_a_function_of_document_and_seed(dataset: Path) -> None:
    for split in ("train", "val"):
        docs = shard_docs(dataset, split)
        assert docs and all(choose_split(doc, 7, 0.2) == split for _, doc in docs)
    sources = [source for source, _ in shard_docs(dataset, "train")]
    assert sources == sorted(sources)  # documents keep input order within a split


def write_bad_inputs(root: Path) -> None:
    good = json.dumps({"text": "fine"})
    (root / "bad.jsonl").write_text(f'{good}\n{{"text": "unterminated\n{{"title": "no text field"}}\n{good}\n')
    (root / "broken.txt.gz").write_bytes(b"this is not gzip data")


def test_bad_inputs_are_reported_counted_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    write_bad_inputs(tmp_path / "in")
    assert build([tmp_path / "in"], tmp_path / "out") == 0
    out, err = capsys.readouterr()
    assert "skipped in/bad.jsonl:2: invalid JSON line" in err
    assert "skipped in/bad.jsonl:3: field 'text' missing" in err
    assert "skipped in/broken.txt.gz: BadGzipFile" in err
    assert "skipped: 3 inputs" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == 3
    assert [e["source"] for e in manifest["skipped_examples"]] == ["in/bad.jsonl:2", "in/bad.jsonl:3", "in/broken.txt.gz"]
    assert [d for _, d in shard_docs(tmp_path / "out")] == [b"fine", b"fine"]


def test_strict_makes_a_bad_input_fatal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    write_bad_inputs(tmp_path / "in")
    assert build([tmp_path / "in"], tmp_path / "out", "--strict") == 1
    assert "in/bad.jsonl:2: invalid JSON line" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_input_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert build([tmp_path / "nowhere"], tmp_path / "out") == 1
    assert "nowhere" in capsys.readouterr().err


def test_output_inside_an_input_tree_is_not_read_back(tmp_path: Path) -> None:
    write_text_corpus(tmp_path, files=3, mean_bytes=500)
    corpus = tmp_path / "corpus"
    assert build([corpus], corpus / "shards") == 0
    first = dataset_files(corpus / "shards")
    assert build([corpus], corpus / "shards") == 0  # its own shards must not become inputs
    assert dataset_files(corpus / "shards") == first


def test_a_datasets_save_to_disk_folder_is_an_input(tmp_path: Path) -> None:
    """A Dataset (two Arrow tables) and a DatasetDict written by `datasets` itself, with --text-field."""
    import datasets

    texts = ["first ünïcødé ✓", "", "third\nwith a newline", "字节 fourth", "fifth"]
    table = datasets.Dataset.from_dict({"body": texts, "id": list(range(len(texts)))})
    table.save_to_disk(str(tmp_path / "in" / "ds"), num_shards=2)
    datasets.DatasetDict({"train": table.select([0, 1]), "test": table.select([4])}).save_to_disk(
        str(tmp_path / "in" / "dd"))
    assert build([tmp_path / "in"], tmp_path / "out", "--text-field", "body") == 0
    docs = dict(shard_docs(tmp_path / "out"))
    assert sorted(docs.values()) == sorted(t.encode() for t in [*texts, texts[0], texts[1], texts[4]])
    assert docs["in/ds/data-00001-of-00002.arrow[0]"] == texts[3].encode()  # shard 1 holds rows 3-4
    assert not any(source.endswith(".json") for source in docs)  # the metadata is no document
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == 0
    # a wrong --text-field: each table is skipped, the reason naming the field
    assert build([tmp_path / "in" / "ds"], tmp_path / "bad", "--text-field", "text") == 0
    bad = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    assert bad["skipped"] == 2 and bad["shards"] == []
    assert all("no column 'text' (--text-field)" in skip["reason"] for skip in bad["skipped_examples"])
