"""ByteStream and the sequential readers against an independent reading of the shards."""

from __future__ import annotations

import gc
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from megatrain.data import ByteStream, read_split
from megatrain.data.format import FormatError, Manifest
from tests.data.helpers import copy_dataset, edit_manifest, shard_docs, shard_files, split_stream

SEQ = 512
# Small shuffle blocks, so that the test corpus has dozens of blocks across its shards.
SMALL_BLOCKS = {"block_bytes": 8192, "group_blocks": 3}


def stream_of(dataset: Path, **options: object) -> ByteStream:
    kwargs = {"seq_len": SEQ, "global_batch_size": 8, "micro_batch_size": 2, "seed": 5} | SMALL_BLOCKS | options
    return ByteStream(dataset, "train", **kwargs)


def take_steps(loader: ByteStream, steps: int) -> list[torch.Tensor]:
    """The rank's samples of each of the next `steps` steps, one tensor per step."""
    accum = loader.global_batch_size // (loader.micro_batch_size * loader.dp_size)
    return [torch.cat([next(loader) for _ in range(accum)]) for _ in range(steps)]


def windows_of(stream: bytes, windows: np.ndarray) -> torch.Tensor:
    data = np.frombuffer(stream, np.uint8)
    return torch.from_numpy(np.stack([data[w * SEQ : (w + 1) * SEQ] for w in windows]))


def test_an_epoch_is_a_permutation_of_windows_covering_the_stream(dataset: Path) -> None:
    stream = split_stream(dataset, "train")
    with stream_of(dataset) as loader:
        assert loader.num_samples == len(stream) // SEQ
        order = loader.global_order(0)
        assert sorted(order.tolist()) == list(range(loader.num_samples))
        steps = loader.steps_per_epoch
        assert loader.num_samples - steps * 8 < 8  # only a tail smaller than a global batch is left out
        samples = torch.cat(take_steps(loader, steps))
        assert torch.equal(samples, windows_of(stream, order[: steps * 8]))
        assert loader.state_dict()["samples_consumed"] == steps * 8


def test_order_is_a_pure_function_shuffled_across_shards(dataset: Path) -> None:
    a, b = stream_of(dataset), stream_of(dataset)
    assert np.array_equal(a.global_order(0), b.global_order(0))
    assert np.array_equal(a.global_order(1, 10, 20), b.global_order(1)[10:20])
    assert not np.array_equal(a.global_order(0), a.global_order(1))
    assert not np.array_equal(a.global_order(0), stream_of(dataset, seed=6).global_order(0))
    # The shard of a window: where its start falls among the train shards' cumulative sizes.
    sizes = [s.bytes for s in Manifest.load(dataset).split_shards("train")]
    shard_of_window = np.searchsorted(np.cumsum(sizes), a.global_order(0)[:24] * SEQ, side="right")
    assert len(set(shard_of_window.tolist())) >= 3


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_data_parallel_slices_make_up_the_one_rank_steps(dataset: Path, dp: int) -> None:
    with stream_of(dataset, micro_batch_size=1) as one:
        reference = take_steps(one, 12)
    ranks = [stream_of(dataset, micro_batch_size=1, dp_rank=r, dp_size=dp) for r in range(dp)]
    per_rank = [take_steps(loader, 12) for loader in ranks]
    for step in range(12):
        assert torch.equal(torch.cat([steps[step] for steps in per_rank]), reference[step])
    for loader in ranks:
        loader.close()


def test_resume_mid_epoch_yields_exactly_the_rest_at_any_dp(dataset: Path) -> None:
    with stream_of(dataset) as loader:
        take_steps(loader, 5)
        state = loader.state_dict()
        steps = loader.steps_per_epoch
        rest = take_steps(loader, steps)  # runs into the next epoch
        assert loader.state_dict()["epoch"] == 1
    assert state == {"fingerprint": loader.fingerprint, "seed": 5, "epoch": 0, "samples_consumed": 40}
    with stream_of(dataset, seed=123) as resumed:  # the state's seed wins
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(take_steps(resumed, steps), rest, strict=True))
    ranks = [stream_of(dataset, micro_batch_size=1, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    halves = [take_steps(loader, steps) for loader in ranks]
    assert all(torch.equal(torch.cat([h0, h1]), step) for h0, h1, step in zip(*halves, rest))
    for loader in ranks:
        loader.close()


def test_epochs_roll_over_with_a_new_permutation(dataset: Path) -> None:
    with stream_of(dataset, global_batch_size=64, micro_batch_size=64) as loader:
        epoch0 = torch.cat(take_steps(loader, loader.steps_per_epoch))
        epoch1 = torch.cat(take_steps(loader, loader.steps_per_epoch))
        assert loader.state_dict()["epoch"] == 1
        stream = split_stream(dataset, "train")
        assert torch.equal(epoch1, windows_of(stream, loader.global_order(1)[: len(epoch1)]))
    assert not torch.equal(epoch0, epoch1)


def test_a_state_from_other_data_is_refused(dataset: Path) -> None:
    with stream_of(dataset) as loader:
        state = loader.state_dict() | {"fingerprint": "0" * 64}
        with pytest.raises(ValueError, match="fingerprint"):
            loader.load_state_dict(state)


def test_boundary_follows_every_document(dataset: Path) -> None:
    expected = split_stream(dataset, "val", boundary=b"\xff\x00")
    assert read_split(dataset, "val", boundary=b"\xff\x00").tobytes() == expected
    with ByteStream(dataset, "val", 64, 4, 4, boundary=b"\xff\x00", **SMALL_BLOCKS) as loader:
        batch = next(loader)
        data = np.frombuffer(expected, np.uint8)
        for row, window in zip(batch, loader.global_order(0)[:4], strict=True):
            assert row.numpy().tobytes() == data[window * 64 : (window + 1) * 64].tobytes()


def test_read_split_gives_the_splits_first_bytes(dataset: Path) -> None:
    stream = split_stream(dataset, "val")
    assert read_split(dataset, "val").tobytes() == stream
    assert read_split(dataset, "val", 2500).tobytes() == stream[:2500]


def test_threads_stop_on_close_and_when_abandoned(dataset: Path) -> None:
    before = threading.active_count()
    loader = stream_of(dataset)
    next(loader)
    assert threading.active_count() > before
    loader.close()
    assert threading.active_count() == before
    next(loader)  # iterating again restarts from the state
    del loader
    gc.collect()
    assert threading.active_count() == before


def run_epoch(loader: ByteStream) -> list[torch.Tensor]:
    return take_steps(loader, loader.steps_per_epoch)


def test_truncated_shard_is_named_or_skipped(dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    copy = copy_dataset(dataset, tmp_path)
    shard = copy / shard_files(copy)[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with stream_of(copy) as loader, pytest.raises(RuntimeError, match=f"corrupt shard .*{shard.name}"):
        run_epoch(loader)
    with stream_of(copy, on_corrupt="skip") as loader:
        steps = run_epoch(loader)
    assert all(step.shape == (8, SEQ) for step in steps)
    assert shard.name in caplog.text and "replacing the windows" in caplog.text


def test_shard_that_disagrees_with_the_manifest_is_named(dataset: Path, tmp_path: Path) -> None:
    copy = copy_dataset(dataset, tmp_path)
    shard, other = (copy / name for name in shard_files(copy)[1:3])
    shutil.copyfile(other, shard)  # a valid shard, but not the one the manifest describes
    with stream_of(copy) as loader, pytest.raises(RuntimeError, match=f"{shard.name}: record batch \\d+ has .* manifest says"):
        run_epoch(loader)


def test_manifest_pointing_outside_the_directory_is_refused(dataset: Path, tmp_path: Path) -> None:
    copy = copy_dataset(dataset, tmp_path)
    edit_manifest(copy, lambda raw: raw["shards"][0].update(file="../" + raw["shards"][0]["file"]))
    with pytest.raises(FormatError, match="unsafe shard path"):
        stream_of(copy)


def test_docs_are_read_back_in_manifest_order(dataset: Path) -> None:
    assert read_split(dataset, "train").tobytes() == b"".join(doc for _, doc in shard_docs(dataset, "train"))
