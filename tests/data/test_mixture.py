"""The blended order of several sources (megatrain.data.mixture, MixedStream) on real shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from megatrain.config import ConfigError, parse_source
from megatrain.data.mixed import MixedStream
from megatrain.data.mixture import Mixture, mixture_change, open_sources
from tests.data.helpers import build, split_stream, write_text_corpus

SEQ = 64


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> dict[str, Path]:
    """A source and another about 10x smaller (train split only), built with data_prep."""
    root = tmp_path_factory.mktemp("mixture")
    out = {}
    for name, files, seed in (("big", 30, 1), ("small", 3, 2)):
        corpus = write_text_corpus(root / name, files=files, mean_bytes=5000, seed=seed)
        out[name] = root / name / "shards"
        assert build([corpus], out[name], "--shard-bytes", "16384", "--batch-bytes", "2048", "--val-fraction", "0",
                     "--seed", "0") == 0
    return out


def sources(paths: dict[str, Path], weights: dict[str, float]):
    return open_sources([(name, str(paths[name]), w) for name, w in weights.items()])


def stream_windows(path: Path) -> np.ndarray:
    data = np.frombuffer(split_stream(path, "train"), np.uint8)
    return data[: len(data) // SEQ * SEQ].reshape(-1, SEQ)


def take_steps(stream: MixedStream, steps: int) -> list[np.ndarray]:
    """Each step's samples of this rank, as one array."""
    micro = stream.global_batch_size // stream.dp_size // stream.micro_batch_size
    return [np.concatenate([next(stream).numpy() for _ in range(micro)]) for _ in range(steps)]


def test_shares_of_the_drawn_bytes_follow_the_weights_as_the_small_source_cycles(two_sources):
    """0.8 / 0.2 over 200 steps, the small source (10x smaller) going through its epochs: the
    bytes drawn are 80 / 20 within 2%, and every sample is its source's window byte for byte."""
    mix = sources(two_sources, {"big": 0.8, "small": 0.2})
    windows = {name: stream_windows(path) for name, path in two_sources.items()}
    assert 8 < len(windows["big"]) / len(windows["small"]) < 12
    steps, batch = 200, 16
    with MixedStream(mix, "train", SEQ, global_batch_size=batch, micro_batch_size=batch, seed=5) as stream:
        drawn = {"big": 0, "small": 0}
        got = []
        for _ in range(steps):
            got.append(next(stream).numpy())
            for name, n in stream.last_step_bytes().items():
                drawn[name] += n
        order = stream.global_order(0, steps * batch)
    assert sum(drawn.values()) == steps * batch * SEQ
    assert abs(drawn["small"] / sum(drawn.values()) - 0.2) < 0.02 * 0.2
    expected = np.stack([windows[name][w] for name, w in order])
    assert np.array_equal(np.concatenate(got), expected)
    small = [w for name, w in order if name == "small"]
    n = len(windows["small"])
    assert len(small) > 2 * n  # two whole epochs and more
    first, second = small[:n], small[n:2 * n]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second  # each epoch its own shuffle


def test_weights_are_shares_of_bytes_normalised():
    m = Mixture(["a", "b"], [3.0, 1.0], [100, 50], seed=0)  # b's samples are half as long: twice as many of them
    assert m.sample_shares == pytest.approx([0.6, 0.4])
    assert Mixture(["a", "b"], [0.75, 0.25], [100, 50], seed=0).shift == m.shift
    counts = m.taken(10_000)
    assert abs(counts[0] - 6000) <= 16 and sum(counts) == 10_000


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.9, 0.07, 0.03], [1.0]])
def test_the_closed_form_counts_are_those_of_the_sequence(weights):
    m = Mixture([str(i) for i in range(len(weights))], weights, [256] * len(weights), seed=11)
    counts = [0] * len(weights)
    for i in range(1500):
        assert m.taken(i) == counts, i
        counts[m.source_of(i)] += 1
    assert m.taken(2**40 + 12345)[0] == pytest.approx((2**40 + 12345) * m.sample_shares[0], abs=64)


def test_the_order_is_the_same_at_any_data_parallel_size_byte_for_byte(two_sources):
    mix = sources(two_sources, {"big": 0.7, "small": 0.3})
    steps, batch = 12, 8

    def blended(dp: int) -> list[np.ndarray]:
        ranks = [MixedStream(mix, "train", SEQ, global_batch_size=batch, micro_batch_size=2, dp_rank=r, dp_size=dp,
                             seed=3) for r in range(dp)]
        per_rank = [take_steps(s, steps) for s in ranks]
        for s in ranks:
            s.close()
        return [np.concatenate([rank[step] for rank in per_rank]) for step in range(steps)]

    one = blended(1)
    for dp in (2, 4):
        assert all(np.array_equal(a, b) for a, b in zip(one, blended(dp))), dp


def test_a_restored_state_continues_the_order_at_another_dp_size(two_sources):
    mix = sources(two_sources, {"big": 0.5, "small": 0.5})
    with MixedStream(mix, "train", SEQ, global_batch_size=8, micro_batch_size=8, seed=2) as straight:
        whole = [next(straight).numpy() for _ in range(6)]
    with MixedStream(mix, "train", SEQ, global_batch_size=8, micro_batch_size=8, seed=2) as first:
        [next(first) for _ in range(4)]
        state = first.state_dict()
    assert state["samples_consumed"] == 32
    halves = [MixedStream(mix, "train", SEQ, global_batch_size=8, micro_batch_size=4, dp_rank=r, dp_size=2, seed=2)
              for r in range(2)]
    for s in halves:
        s.load_state_dict(state)
    resumed = [np.concatenate([next(s).numpy() for s in halves]) for _ in range(2)]
    for s in halves:
        s.close()
    assert all(np.array_equal(a, b) for a, b in zip(whole[4:], resumed))
    other = MixedStream(sources(two_sources, {"big": 0.6, "small": 0.4}), "train", SEQ, 8, 8, seed=2)
    with pytest.raises(ValueError, match="weight"):
        other.load_state_dict(state)


def test_a_corrupt_shard_is_replaced_alike_at_any_dp_size_and_on_resume(two_sources, tmp_path):
    """on_corrupt="skip": a window of a truncated shard is replaced by the next readable
    sample of its source, a choice of the files alone; every data-parallel size, and a run
    resumed mid-way, trains on the same bytes."""
    paths = {name: tmp_path / name for name in two_sources}
    for name, path in two_sources.items():
        shutil.copytree(path, paths[name])
    shard = sorted(paths["big"].glob("train-*.arrow"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    mix = sources(paths, {"big": 0.7, "small": 0.3})
    steps, batch = 10, 8

    def stream(dp_rank: int = 0, dp_size: int = 1) -> MixedStream:
        return MixedStream(mix, "train", SEQ, global_batch_size=batch, micro_batch_size=2, dp_rank=dp_rank,
                           dp_size=dp_size, seed=3, on_corrupt="skip")

    def blended(dp: int, state: dict | None = None) -> list[np.ndarray]:
        ranks = [stream(r, dp) for r in range(dp)]
        for s in ranks:
            if state:
                s.load_state_dict(state)
        per_rank = [take_steps(s, steps - (state["samples_consumed"] // batch if state else 0)) for s in ranks]
        assert {path for s in ranks for path in s.corrupt_shards()} == {str(shard)}
        for s in ranks:
            s.close()
        return [np.concatenate([rank[step] for rank in per_rank]) for step in range(len(per_rank[0]))]

    one = blended(1)
    clean = sources(two_sources, {"big": 0.7, "small": 0.3})
    with MixedStream(clean, "train", SEQ, global_batch_size=batch, micro_batch_size=2, seed=3) as whole:
        replaced = sum(not np.array_equal(a, b) for a, b in zip(np.concatenate(one), np.concatenate(
            take_steps(whole, steps))))
    assert replaced > 0, "no sample of the truncated shard in these steps"
    for dp in (2, 4):
        assert all(np.array_equal(a, b) for a, b in zip(one, blended(dp))), dp
    with stream() as first:
        take_steps(first, 4)
        state = first.state_dict()
    assert all(np.array_equal(a, b) for a, b in zip(one[4:], blended(2, state)))


def test_bad_sources_are_named(two_sources, tmp_path):
    big, small = str(two_sources["big"]), str(two_sources["small"])
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    cases = {
        "missing directory": ([("a", big, 1), ("gone", str(tmp_path / "gone"), 1)], r"'gone' .*gone\): no such directory"),
        "zero weight": ([("a", big, 1), ("b", small, 0)], r"'b' .*weight must be positive, got 0"),
        "negative weight": ([("a", big, -0.5), ("b", small, 1)], r"'a' .*weight must be positive, got -0.5"),
        "same name": ([("a", big, 1), ("a", small, 1)], r"the name 'a' is given twice"),
        "same dataset": ([("a", small, 1), ("b", str(copy), 1)], r"'b' .*the same dataset .* as source 'a'"),
    }
    for case, (specs, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            open_sources(specs)


def test_data_option_forms():
    named = parse_source("web=/d/a:b:0.7")  # the weight follows the last colon
    assert (named.name, named.path, named.weight) == ("web", "/d/a:b", 0.7)
    assert (parse_source("/d/code").name, parse_source("/d/code").weight) == ("code", 1.0)
    with pytest.raises(ConfigError, match="--data web=/d:x: weight 'x' is not a number"):
        parse_source("web=/d:x")


def test_mixture_change_names_the_difference():
    saved = [{"name": "a", "fingerprint": "f1", "weight": 0.8}, {"name": "b", "fingerprint": "f2", "weight": 0.2}]
    assert mixture_change(saved, [{**s, "weight": s["weight"] * 10} for s in saved]) is None
    assert "source 'b' has weight 0.2 of 1 in the checkpoint, 0.5 of 1 now" in mixture_change(
        saved, [{**saved[0], "weight": 0.5}, {**saved[1], "weight": 0.5}])
    assert mixture_change(saved, saved[:1] + [{"name": "c", "fingerprint": "f3", "weight": 0.2}]) == (
        "source 'b' only in the checkpoint; source 'c' is new")
    assert "source 'a' is dataset 'f1' in the checkpoint, 'f9' now" in mixture_change(
        saved, [{**saved[0], "fingerprint": "f9"}, saved[1]])
