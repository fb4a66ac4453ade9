"""Training on a mixture of two sources (real multi-process runs, CPU, fp32, tiny.yaml):
resume and elastic resume continue the blend, per-source validation is what
`megatrain.evaluate` scores on each source alone, a changed mixture is refused unless
--allow-data-change, and bad sources stop the run before training.

One dp=2 run (4 steps, checkpoints at 2 and 4, validation at 2 and 4) is shared by all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatrain.checkpoint import read_client_state

from ..distributed import REPO, launch
from .test_pretrain import TINY, Run, batch, relative_gaps

WEIGHTS = {"lib": 0.7, "web": 0.3}
EVAL_BYTES = 8192
EVAL = ["--set", "train.eval_interval=2", "--set", f"train.eval_bytes={EVAL_BYTES}"]


@pytest.fixture(scope="module")
def web_shards(tmp_path_factory) -> Path:
    """A second source: other packages of the standard library than tiny_shards'."""
    stdlib = Path(json.__file__).parents[1]
    files = sorted(str(p) for pkg in ("http", "urllib", "logging") for p in (stdlib / pkg).glob("*.py"))
    out = tmp_path_factory.mktemp("web")
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", *files, "--output", str(out),
                    "--val-fraction", "0.2", "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    return out


def data_args(paths: dict[str, Path], weights: dict[str, float]) -> list[str]:
    return [a for name, w in weights.items() for a in ("--data", f"{name}={paths[name]}:{w}")]


def train(directory: Path, launcher: str, ranks: int, data: list[str], *options: str, steps: int = 4):
    directory.mkdir(parents=True, exist_ok=True)
    args = ["--config", str(TINY), *data, "--train-steps", str(steps), "--metrics", str(directory / "metrics.jsonl"),
            "--save", str(directory / "ckpt"), *options]
    return launch(launcher, ranks, args, directory)


@pytest.fixture(scope="module")
def paths(tiny_shards, web_shards) -> dict[str, Path]:
    return {"lib": tiny_shards, "web": web_shards}


@pytest.fixture(scope="module")
def mixed(paths, cpu_comm, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("mixed")
    return Run(train(out, "torchrun-env", 2, data_args(paths, WEIGHTS), *batch(2, 1), "--save-interval", "2", *EVAL),
               out)


def at_step(ckpt: Path, step: int) -> Path:
    (ckpt / "latest").write_text(f"global_step{step}")
    return ckpt


def test_metrics_carry_each_sources_bytes_and_validation(mixed):
    for r in mixed.steps:
        assert r["source_bytes"].keys() == WEIGHTS.keys() and sum(r["source_bytes"].values()) == 4 * 256
    assert sum(r["source_bytes"]["web"] for r in mixed.steps) > 0
    val = [r for r in mixed.steps if "val_bpb" in r]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert min(r["val_bpb/lib"], r["val_bpb/web"]) <= r["val_bpb"] <= max(r["val_bpb/lib"], r["val_bpb/web"])


@pytest.mark.parametrize("launcher, ranks, options", [("torchrun-env", 2, batch(2, 1)),
                                                       ("python", 1, batch(4, 1))], ids=["dp2", "dp2->1"])
def test_resume_continues_the_blend(mixed, paths, tmp_path, launcher, ranks, options):
    """From step 2's checkpoint, at the same and at half the dp size: steps 3 and 4 draw the
    same bytes from each source, with the same losses, as the straight run."""
    ckpt = at_step(mixed.dir / "ckpt", 2)
    resumed = Run(train(tmp_path, launcher, ranks, data_args(paths, WEIGHTS), *options, "--load", str(ckpt)),
                  tmp_path)
    assert [r["step"] for r in resumed.steps] == [3, 4]
    assert [r["source_bytes"] for r in resumed.steps] == [r["source_bytes"] for r in mixed.steps[2:]]
    assert max(relative_gaps(mixed.losses()[2:], resumed.losses(2))) < (1e-6 if ranks == 2 else 1e-4)


def test_per_source_validation_is_what_evaluate_scores_on_each_source(mixed, paths):
    """The step-4 checkpoint under `python -m megatrain.evaluate` with both sources: one row per
    source, each equal to training's val_bpb/<name>, and the byte-weighted mean last."""
    ckpt = at_step(mixed.dir / "ckpt", 4)
    result = subprocess.run([sys.executable, "-m", "megatrain.evaluate", "--load", str(ckpt),
                             *[a for name in WEIGHTS for a in ("--data", f"{name}={paths[name]}")],
                             "--max-bytes", str(EVAL_BYTES)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()[-3:]]
    logged = mixed.steps[3]
    assert [r.get("source") for r in rows] == ["lib", "web", None]
    for row in rows[:2]:
        assert row["bytes"] == EVAL_BYTES
        assert row["bpb"] == pytest.approx(logged[f"val_bpb/{row['source']}"], rel=1e-5)
    assert rows[2]["bpb"] == pytest.approx(logged["val_bpb"], rel=1e-5) == (rows[0]["bpb"] + rows[1]["bpb"]) / 2


def test_another_mixture_is_refused_unless_allowed(mixed, paths, tmp_path):
    ckpt = at_step(mixed.dir / "ckpt", 2)
    other = data_args(paths, {"lib": 0.5, "web": 0.5})
    refused = train(tmp_path / "refused", "python", 1, other, *batch(4, 1), "--load", str(ckpt))
    assert refused.returncode == 2, refused.output[-3000:]
    assert "another data mixture (source 'lib' has weight 0.7 of 1 in the checkpoint, 0.5 of 1 now" in refused.output
    assert "--allow-data-change" in refused.output and not (tmp_path / "refused" / "metrics.jsonl").exists()

    allowed = Run(train(tmp_path / "allowed", "python", 1, other, *batch(4, 1), "--load", str(ckpt),
                        "--allow-data-change", steps=3), tmp_path / "allowed")
    assert "starts from the beginning of its own order" in allowed.job.output
    assert [r["step"] for r in allowed.steps] == [3]
    saved = read_client_state(tmp_path / "allowed" / "ckpt" / "global_step3")
    assert saved["data"]["samples_consumed"] == 4  # one step of the new mixture, from its own start
    assert [s["weight"] for s in saved["mixture"]] == [0.5, 0.5]


def test_bad_sources_stop_the_run_before_training(paths, cpu_comm, tmp_path):
    """A zero weight on the command line; a name given twice in the YAML's data.sources."""
    zero = train(tmp_path / "zero", "python", 1, data_args(paths, {"lib": 1, "web": 0}))
    assert zero.returncode == 2 and "data source 'web'" in zero.output and "weight must be positive, got 0" in zero.output
    config = tmp_path / "twice.yaml"
    config.write_text(TINY.read_text() + f"  sources:\n    - {{name: a, path: {paths['lib']}, weight: 1}}\n"
                      f"    - {{name: a, path: {paths['web']}, weight: 2}}\n")
    twice = launch("python", 1, ["--config", str(config), "--metrics", str(tmp_path / "m.jsonl")], tmp_path)
    assert twice.returncode == 2 and "the name 'a' is given twice" in twice.output
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "zero" / "metrics.jsonl").exists()
