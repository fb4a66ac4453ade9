import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from megatrain.model.decoding import context_start, generate
from megatrain.reference import save_reference

from .model.test_megabyte import VARIANTS, fit, model_for

TEXT = b"MEGABYTE models million-byte sequences with a global and a local transformer."


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny model trained until it has learned TEXT by heart."""
    cfg = replace(VARIANTS["plain"], seq_len=80, global_dim=64, local_dim=32, init_std=0.02)
    model = model_for(cfg)
    fit(model, torch.tensor([list(TEXT.ljust(80, b" "))]), max_steps=800, stop_below=0.005)
    path = tmp_path_factory.mktemp("gen") / "model.pt"
    save_reference(model.eval(), path)
    return model, path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatrain.generate", *args], capture_output=True, timeout=120)


def test_memorised_string_is_reproduced_from_its_prefix(memorised):
    model, _ = memorised
    out = bytes(generate(model, TEXT[:12], len(TEXT) - 12, temperature=0))
    assert out == TEXT[12:]


def test_cli_same_bytes_with_and_without_cache(memorised, tmp_path):
    _, path = memorised
    common = ["--load", str(path), "--prompt", "MEGA", "--max-bytes", "150", "--temperature", "1.5",
              "--top-p", "0.95", "--seed", "7"]
    cached = run_cli(*common)
    uncached = run_cli(*common, "--no-cache", "--out", str(tmp_path / "out.bin"))
    assert cached.returncode == 0, cached.stderr.decode()
    assert uncached.returncode == 0, uncached.stderr.decode()
    assert len(cached.stdout) == 150  # past seq_len (80): the context window moved on
    assert cached.stdout == (tmp_path / "out.bin").read_bytes()
    assert run_cli(*common[:-1], "8").stdout != cached.stdout  # the seed matters


def test_stop_string(memorised):
    model, _ = memorised
    out = bytes(generate(model, TEXT[:12], 100, temperature=0, stop=b"global"))
    assert out.endswith(b"global") and b"local" not in out


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "", "--max-bytes", "5"], "--prompt is empty"),
    (["--prompt", "a", "--max-bytes", "0"], "--max-bytes must be positive"),
])
def test_cli_bad_input(memorised, args, needle):
    result = run_cli("--load", str(memorised[1]), *args)
    assert result.returncode != 0 and needle in result.stderr.decode()


def test_cli_missing_checkpoint(tmp_path):
    result = run_cli("--load", str(tmp_path / "nope.pt"), "--prompt", "a", "--max-bytes", "3")
    assert result.returncode != 0 and "nope.pt: no such checkpoint" in result.stderr.decode()


def test_context_window_moves_by_whole_patches():
    assert context_start(79, 80, 4) == 0
    assert [context_start(n, 80, 4) for n in (80, 119, 120, 159)] == [40, 40, 80, 80]


@pytest.mark.parametrize("prompt", [b"ab", b"a prompt of 4 patches and a bit"])
def test_greedy_cached_equals_uncached_across_window_moves(prompt):
    model = model_for(VARIANTS["both"])
    kwargs = dict(temperature=0, max_bytes=70)
    assert list(generate(model, prompt, **kwargs)) == list(generate(model, prompt, use_cache=False, **kwargs))
