"""Export of a pp=2 x tp=2 training checkpoint into the reference model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatrain.checkpoint import CheckpointError, load_model, read_client_state, resolve_tag
from megatrain.data import read_split
from megatrain.model import Megabyte, StageInput
from megatrain.scoring import bits_per_byte
from megatrain.reference import load_reference

from .distributed import REPO, launch, run_ranks

SEQ = 256  # tiny.yaml's seq_len
VAL_BYTES = 8 * SEQ + 100  # the validation's last window is short: padded, its padding unscored


@pytest.fixture(scope="module")
def parallel_run(tiny_shards, cpu_comm, tmp_path_factory):
    """3 steps of tiny.yaml on pp=2 x tp=2, validated and saved at the end (the metrics in a
    directory that --metrics itself has to make)."""
    out = tmp_path_factory.mktemp("export")
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--data", str(tiny_shards), "--pp", "2", "--tp", "2",
            "--train-steps", "3", "--save", str(out / "ckpt"), "--metrics", str(out / "runs" / "x" / "metrics.jsonl"),
            "--set", "train.eval_interval=3", "--set", f"train.eval_bytes={VAL_BYTES}"]
    job = launch("slurm-env", 4, args, out)
    assert job.returncode == 0, job.output[-5000:]
    return out


def test_export_gives_the_parallel_models_validation_bits_per_byte(parallel_run, tiny_shards):
    result = subprocess.run([sys.executable, "-m", "megatrain.checkpoint", "export", str(parallel_run / "ckpt"),
                             str(parallel_run / "model.pt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    model = load_reference(parallel_run / "model.pt")
    last = json.loads((parallel_run / "runs" / "x" / "metrics.jsonl").read_text().splitlines()[-1])
    reference = bits_per_byte(model, read_split(tiny_shards, "val", VAL_BYTES), SEQ, 8)
    assert reference["bpb"] == pytest.approx(last["val_bpb"], rel=1e-5)
    # the directory loads directly too, to the same weights
    direct = load_model(parallel_run / "ckpt")
    exported, loaded = model.state_dict(), direct.state_dict()
    assert exported.keys() == loaded.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, loaded[name]), name
    direct.load_state_dict(exported, strict=True)


# (launcher, ranks, how it names the module, options): the plain scoring on pp=2 x dp=2 under the
# deepspeed launcher, the other two on the pipeline alone (2 ranks; a launch of 4 is some 10 s)
EVALUATIONS = {"plain": ("deepspeed", 4, "--module", []), "strided": ("torchrun-env", 2, "-m", ["--strided"]),
               "sliding": ("torchrun-env", 2, "-m", ["--sliding", "128"])}


@pytest.mark.parametrize("mode", EVALUATIONS)
def test_parallel_evaluation_equals_the_reference_models(parallel_run, tiny_shards, mode):
    """The checkpoint run as a pipeline of 2 stages, and the exported model on this process."""
    launcher, ranks, module, options = EVALUATIONS[mode]
    evaluate = ["--load", str(parallel_run / "ckpt"), "--data", str(tiny_shards), "--max-bytes", str(VAL_BYTES),
                *options, "--pp", "2", "--batch-size", "2"]
    logs = parallel_run / "eval" / mode
    logs.mkdir(parents=True)
    parallel = launch(launcher, ranks, evaluate, logs, program=(module, "megatrain.evaluate"))
    assert parallel.returncode == 0, parallel.output[-5000:]
    # the launcher's own log lines may follow rank 0's JSON line
    got = json.loads([line for line in parallel.output.splitlines() if line.startswith('{"bpb"')][-1])
    expected = bits_per_byte(load_model(parallel_run / "ckpt"), read_split(tiny_shards, "val", VAL_BYTES), SEQ, 8,
                             strided=mode == "strided", sliding=128 if mode == "sliding" else None)
    assert got["bytes"] == expected["bytes"] == VAL_BYTES
    assert got["bpb"] == pytest.approx(expected["bpb"], rel=1e-5)


def test_parallel_evaluation_refuses_a_layout_the_ranks_cannot_form(parallel_run, tiny_shards):
    result = subprocess.run([sys.executable, "-m", "megatrain.evaluate", "--load", str(parallel_run / "ckpt"),
                             "--data", str(tiny_shards), "--pp", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pp * tp = 2 * 1 = 2 does not divide the world size 1" in result.stderr


def test_export_bad_input(parallel_run, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_tag(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        resolve_tag(tmp_path)
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match="names global_step9, which holds no complete checkpoint"):
        resolve_tag(tmp_path)
    result = subprocess.run([sys.executable, "-m", "megatrain.checkpoint", "export", str(tmp_path / "none"),
                             str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "none: no such checkpoint directory" in result.stderr


@pytest.fixture(scope="module")
def published(parallel_run) -> Path:
    """`export CKPT DIR` of the parallel run: the folder."""
    out = parallel_run / "published"
    result = subprocess.run([sys.executable, "-m", "megatrain.checkpoint", "export", str(parallel_run / "ckpt"),
                             str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def trained_pipeline_logits(rank: int, world_size: int, ckpt: str, x: torch.Tensor) -> tuple | None:
    """The logits for x [B, T] of the checkpoint's model as the DeepSpeed pipeline that trained
    it (pp=2 x tp=2, its own files loaded by DeepSpeed, none of megatrain's resharding), on the
    last stage: (tp rank, the logits of its share of the bytes); None on the first stage."""
    import deepspeed

    from megatrain.parallel import MegabytePipeline, plan_layout
    from megatrain.scoring.pipeline import evaluation_config
    from megatrain.train.distributed import init_distributed
    from megatrain.train.ds_config import deepspeed_config

    tag = resolve_tag(ckpt)
    cfg = evaluation_config(read_client_state(tag)["config"], 2, 2, x.shape[0], "run config")
    init_distributed(cfg.parallel.timeout_s)  # DeepSpeed's view of the harness's process group
    layout = plan_layout(cfg, world_size)
    model = MegabytePipeline(cfg.model, layout, cfg.train.seed, cfg.parallel.partition_method)
    engine, *_ = deepspeed.initialize(model=model, config={**deepspeed_config(cfg, layout),
                                                           "zero_optimization": {"stage": 0}})
    engine.load_checkpoint(str(tag.parent), tag=tag.name, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    _, logits = engine.eval_batch(iter([(x, x)]), return_logits=True, num_micro_batches=1)
    coord = layout.topology().get_coord(rank)
    return (coord.model, logits) if coord.pipe == layout.pp - 1 else None


def test_exported_model_gives_the_pipelines_logits(parallel_run, published, tiny_shards):
    """The published folder (loaded by name, strictly) computes the logits that the trained
    pipeline computes from its own files, byte for byte of two validation windows."""
    x = torch.from_numpy(read_split(tiny_shards, "val", 2 * SEQ).copy()).long().view(2, SEQ)
    shares = sorted((s for s in run_ranks(trained_pipeline_logits, 4, str(parallel_run / "ckpt"), x) if s),
                    key=lambda share: share[0])
    assert [tp_rank for tp_rank, _ in shares] == [0, 1]
    last = torch.cat([logits for _, logits in shares], dim=1)  # each tp rank scores its half of the patches
    assert last.shape == (2, SEQ, 256)
    with torch.no_grad():
        exported = Megabyte.from_pretrained(published)(x)
    torch.testing.assert_close(exported, last, rtol=0, atol=1e-5)


def test_safetensors_export_is_a_folder_to_publish(parallel_run, published, tiny_shards):
    """export CKPT DIR: safetensors + config.json + model card, loaded with no pickle to the same weights."""
    out = published
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with pytest.MonkeyPatch.context() as patch:  # no pickle anywhere: torch.load would fail
        patch.setattr(torch, "load", None)
        model = Megabyte.from_pretrained(out)
    published, direct = model.state_dict(), load_model(parallel_run / "ckpt").state_dict()
    assert published.keys() == direct.keys()
    for name, tensor in published.items():
        assert torch.equal(tensor, direct[name]), name
    local_input = [layer for layer in model.layers if isinstance(layer, StageInput)][-1]
    assert model.layers[-1].out.weight is local_input.byte_embed.weight  # still tied after loading
    last = json.loads((parallel_run / "runs" / "x" / "metrics.jsonl").read_text().splitlines()[-1])
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    card = (out / "README.md").read_text()
    assert f"| validation bits per byte | {last['val_bpb']:.4f} |" in card
    assert f"| training steps | {last['step']} |" in card
    assert manifest["fingerprint"] in card and "| seq_len | `256` |" in card
    # evaluate and generate take the folder
    evaluate = subprocess.run([sys.executable, "-m", "megatrain.evaluate", "--load", str(out), "--data",
                               str(tiny_shards), "--max-bytes", str(VAL_BYTES)], capture_output=True, text=True,
                              timeout=120)
    assert evaluate.returncode == 0, evaluate.stderr
    assert json.loads(evaluate.stdout.splitlines()[-1])["bpb"] == pytest.approx(last["val_bpb"], rel=1e-5)
    generate = subprocess.run([sys.executable, "-m", "megatrain.generate", "--load", str(out), "--prompt", "ab",
                               "--max-bytes", "5", "--seed", "0"], capture_output=True, timeout=120)
    assert generate.returncode == 0, generate.stderr
    # --format safetensors writes a folder whatever its name; a folder missing its config is named
    subprocess.run([sys.executable, "-m", "megatrain.checkpoint", "export", "--format", "safetensors",
                    str(parallel_run / "ckpt"), str(parallel_run / "as_dir.pt")], check=True, timeout=120)
    assert (parallel_run / "as_dir.pt" / "model.safetensors").is_file()
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Megabyte.from_pretrained(out)
