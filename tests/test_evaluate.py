import json
import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megatrain.data import read_split
from megatrain.scoring import bits_per_byte, plan_windows
from megatrain.model import Megabyte, MegabyteConfig, bytes_loss
from megatrain.reference import save_reference


@pytest.mark.parametrize("n", [1, 5, 64, 100, 257])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("sliding", [None, 8, 32])
def test_every_byte_scored_exactly_once(n, strided, sliding):
    counts = Counter()
    for w in plan_windows(n, seq_len=32, patch_size=8, strided=strided, sliding=sliding):
        assert w.start % 4 == 0 and 0 < w.length <= 32  # patch- or half-patch-aligned
        counts.update((w.start + np.flatnonzero(w.score)).tolist())
    assert counts == Counter(range(n))


def test_strided_keeps_the_first_half_of_each_patch():
    for w in plan_windows(64, seq_len=32, patch_size=8, strided=True):
        assert not w.score[(np.arange(w.length) % 8) >= 4].any()


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("sliding", [8, 16])
def test_sliding_windows_give_each_scored_byte_all_but_a_stride_of_context(strided, sliding):
    """Windows `sliding` bytes apart; past the first, a window scores only its last `sliding`
    bytes, each seeing at least seq_len - sliding bytes before it."""
    windows = list(plan_windows(300, seq_len=32, patch_size=8, strided=strided, sliding=sliding))
    for offset in ((0, 4) if strided else (0,)):
        starts = [w.start for w in windows if w.start % 8 == offset]
        assert starts == list(range(offset, starts[-1] + 1, sliding))
    for w in windows:
        if w.start >= 8:  # past each pass's first window
            assert np.flatnonzero(w.score).min() >= 32 - sliding


def copy_model(period: int):
    """Logits that name the byte `period` bytes back (uniform with less context): a model
    that is right exactly where the window holds the context it needs."""
    def logits(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*x.shape, 256)
        out[:, period:].scatter_(-1, x[:, :-period, None], 20.0)
        return out
    return logits


def test_sliding_windows_score_better_where_context_beyond_a_window_start_matters():
    """A source that repeats every 64 bytes: plain 128-byte windows guess their first 64
    bytes, sliding ones (stride 32) see 96 bytes before every byte they score."""
    data = np.tile(np.random.default_rng(0).integers(256, size=64, dtype=np.uint8), 64)
    model = copy_model(64)
    plain = bits_per_byte(model, data, 128, 8)["bpb"]
    assert plain == pytest.approx(4.0, abs=0.01)  # half of each window guessed at 8 bits
    sliding = bits_per_byte(model, data, 128, 8, sliding=32)["bpb"]
    assert sliding < 0.2  # only the first window's first 64 bytes are guessed
    assert bits_per_byte(model, data, 128, 8, strided=True, sliding=32)["bpb"] < 0.2


def test_bad_sliding_stride():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        list(plan_windows(100, 32, 8, sliding=12))


def test_zero_logits_score_8_bits_per_byte():
    data = np.frombuffer(bytes(range(256)) * 3, dtype=np.uint8)
    result = bits_per_byte(lambda x: torch.zeros(*x.shape, 256), data, seq_len=64, patch_size=8, strided=True)
    assert result["bytes"] == len(data)
    assert abs(result["bpb"] - 8.0) < 1e-6


def train_tiny(cfg: MegabyteConfig, data: bytes | np.ndarray, steps: int = 400) -> Megabyte:
    """A MEGABYTE of `cfg` trained briefly (Adam, 16 windows a step) on the bytes `data`."""
    torch.manual_seed(0)
    model = Megabyte(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.tensor(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):  # windows at random offsets, so no alignment is memorised
        starts = torch.randint(len(data) - cfg.seq_len, (16, 1), generator=gen)
        x = data[starts + torch.arange(cfg.seq_len)]
        loss = bytes_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """A tiny MEGABYTE trained briefly on one stdlib file, and a sample of it."""
    train = Path(textwrap.__file__).read_bytes()
    cfg = MegabyteConfig(seq_len=128, patch_size=8, global_dim=128, global_layers=2, global_heads=4,
                         local_dim=64, local_layers=2, local_heads=4, dropout=0.0, init_std=0.02)
    return train_tiny(cfg, train), np.frombuffer(train[:4096], dtype=np.uint8)


def test_plain_equals_mean_loss_over_windows(trained):
    model, data = trained
    result = bits_per_byte(model, data, seq_len=128, patch_size=8)
    x = torch.from_numpy(data.astype(np.int64)).view(-1, 128)
    with torch.no_grad():
        expected = bytes_loss(model(x), x).item() / math.log(2)
    assert result["bytes"] == len(data)
    assert result["bpb"] == pytest.approx(expected, rel=1e-5)
    assert result["bpb"] < 5  # it learned something


def test_sliding_windows_do_better_than_plain_on_text(trained):
    model, data = trained
    assert bits_per_byte(model, data, 128, 8, sliding=32)["bpb"] < bits_per_byte(model, data, 128, 8)["bpb"]


def test_strided_takes_each_byte_from_the_pass_where_it_opens_a_half_patch(trained):
    """Independent two-pass computation: byte b comes from pass A if b % P < P/2, else pass B."""
    model, data = trained
    data = data[:1024]
    x = torch.from_numpy(data.astype(np.int64))

    def per_byte_nats(start: int) -> dict[int, float]:
        out = {}
        for s in range(start, len(x), 128):
            window = x[s:s + 128][None]
            with torch.no_grad():
                nats = torch.nn.functional.cross_entropy(model(window)[0], window[0], reduction="none")
            out.update({s + i: v for i, v in enumerate(nats.tolist())})
        return out

    a, b = per_byte_nats(0), per_byte_nats(4)
    total = sum(a[i] if i % 8 < 4 else b[i] for i in range(len(x)))
    result = bits_per_byte(model, data, 128, 8, strided=True)
    assert result["bpb"] == pytest.approx(total / len(x) / math.log(2), rel=1e-6)


def sum_of_two_before(n: int, seed: int) -> np.ndarray:
    """Bytes 'a'-'d' where each is the sum (mod 4) of the two before it, or (5% of the
    time) random."""
    rng = np.random.default_rng(seed)
    x = rng.integers(4, size=n)
    keep = rng.random(n) >= 0.05
    for t in range(2, n):
        if keep[t]:
            x[t] = (x[t - 1] + x[t - 2]) % 4
    return (x + ord("a")).astype(np.uint8)


def test_strided_evaluation_is_not_worse_than_plain_where_the_local_model_is_weaker():
    """Section 2.3.3: strided inference helps because loss grows towards the end of a patch,
    where the prediction relies more on the weaker local model. That is the paper's large
    models; a tiny model trained briefly on text is the other way round (a patch's first
    byte sees the byte before it only through the global model), so this one learns a
    source where the next byte is a function of the two before it: the global model
    computes it for a patch's first byte, the small local model more of it the further
    into the patch it is."""
    cfg = MegabyteConfig(seq_len=128, patch_size=8, global_dim=256, global_layers=2, global_heads=4,
                         local_dim=16, local_layers=1, local_heads=1, dropout=0.0, init_std=0.02)
    model = train_tiny(cfg, sum_of_two_before(100_000, seed=0))
    sample = sum_of_two_before(8192, seed=1)
    plain = bits_per_byte(model, sample, 128, 8)["bpb"]
    assert plain < 1.5  # it learned the source (random bytes 'a'-'d' would be 2 bits)
    assert bits_per_byte(model, sample, 128, 8, strided=True)["bpb"] <= plain
    sliding = bits_per_byte(model, sample, 128, 8, sliding=32)["bpb"]
    assert bits_per_byte(model, sample, 128, 8, strided=True, sliding=32)["bpb"] <= sliding


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatrain.evaluate", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_scores_a_split_of_real_shards(trained, tiny_shards, tmp_path):
    model, _ = trained
    save_reference(model, tmp_path / "model.pt")
    for extra in ([], ["--strided", "--sliding", "64"]):
        result = run_cli("--load", str(tmp_path / "model.pt"), "--data", str(tiny_shards), "--max-bytes", "5000",
                         *extra)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        data = read_split(tiny_shards, "val", 5000)
        expected = bits_per_byte(model, data, 128, 8, strided=bool(extra), sliding=64 if extra else None)
        assert report["bytes"] == 5000 and report["bpb"] == pytest.approx(expected["bpb"], rel=1e-6)


@pytest.mark.parametrize("args, needle", [
    (["--max-bytes", "0"], "--max-bytes must be positive"),
    (["--split", "nope"], "nope"),
])
def test_cli_bad_input(trained, tiny_shards, tmp_path, args, needle):
    save_reference(trained[0], tmp_path / "model.pt")
    result = run_cli("--load", str(tmp_path / "model.pt"), "--data", str(tiny_shards), *args)
    assert result.returncode != 0 and needle in result.stderr


def test_cli_missing_checkpoint(tiny_shards, tmp_path):
    result = run_cli("--load", str(tmp_path / "none.pt"), "--data", str(tiny_shards))
    assert result.returncode != 0 and "none.pt: no such checkpoint" in result.stderr
