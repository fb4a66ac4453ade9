"""The `megatrain` model type in a real lm-evaluation-harness run on local tasks
(tests/lm_eval_tasks: YAML + jsonl, no download), checked against scores computed directly."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatrain.scoring import bits_per_byte
from megatrain.likelihood import loglikelihoods
from megatrain.model import Megabyte, MegabyteConfig
from megatrain.model.decoding import generate
from megatrain.reference import save_reference

from .distributed import REPO

TASKS = REPO / "tests" / "lm_eval_tasks"
NAMES = ["megatrain_choice", "megatrain_rolling", "megatrain_generate"]
# seq_len 64: the tasks' long contexts and documents take several windows
CONFIG = MegabyteConfig(seq_len=64, patch_size=8, global_dim=64, global_layers=2, global_heads=2, local_dim=32,
                        local_layers=2, local_heads=2, dropout=0.0, init_std=0.3)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """One random but peaked model, exported both ways."""
    out = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = Megabyte(CONFIG).eval()
    model.save_pretrained(out / "folder")
    save_reference(model, out / "model.pt")
    return model, out


def offline_env(tmp) -> dict[str, str]:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
            "TOKENIZERS_PARALLELISM": "false"}


def docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


def direct_loglikelihood(model: Megabyte, context: bytes, continuation: bytes) -> float:
    """The model run once on the last seq_len bytes (the continuations here fit)."""
    data = (context + continuation)[-model.config.seq_len:]
    x = torch.tensor([list(data)])
    with torch.no_grad():
        logp = model(x)[0].log_softmax(-1)
    n = len(continuation)
    return sum(logp[len(data) - n + i, continuation[i]].item() for i in range(n))


def expected_metrics(model: Megabyte) -> dict[str, dict[str, float]]:
    cfg = model.config
    acc = []
    for doc in docs("choice"):
        scores = [direct_loglikelihood(model, doc["question"].encode(), f" {c}".encode()) for c in doc["choices"]]
        acc.append(float(np.argmax(scores) == doc["answer"]))
    texts = [d["text"] for d in docs("rolling")]
    nats = sum(bits_per_byte(model, np.frombuffer(t.encode(), np.uint8), cfg.seq_len, cfg.patch_size)["nats"]
               for t in texts)
    n_bytes, n_words = sum(len(t.encode()) for t in texts), sum(len(re.split(r"\s+", t)) for t in texts)
    outputs = []
    for doc in docs("generate"):
        text = bytes(generate(model, doc["prompt"].encode(), 24, temperature=0.0))
        cut = min([i for i in (text.find(b"8"), text.find(b"N")) if i >= 0], default=len(text))
        outputs.append(text[:cut].decode("utf-8", errors="replace"))
    return {"megatrain_choice": {"acc,none": sum(acc) / len(acc)},
            "megatrain_rolling": {"bits_per_byte,none": nats / n_bytes / math.log(2),
                                  "byte_perplexity,none": math.exp(nats / n_bytes),
                                  "word_perplexity,none": math.exp(nats / n_words)},
            "megatrain_generate": {"exact_match,none": float(np.mean([o == d["answer"]
                                                                      for o, d in zip(outputs, docs("generate"))]))},
            "outputs": outputs}


def test_simple_evaluate_matches_the_model(model_files, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megatrain.lm_eval  # noqa: F401  (registers the model type)

    model, out = model_files
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)  # the tasks' data_files are relative to the repository
    results = lm_eval.simple_evaluate(model="megatrain", model_args=f"checkpoint={out / 'model.pt'}", tasks=NAMES,
                                      task_manager=TaskManager(include_path=str(TASKS)), batch_size=2,
                                      log_samples=True)
    expected = expected_metrics(model)
    for task in NAMES:
        for metric, value in expected[task].items():
            assert results["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    generated = sorted(results["samples"]["megatrain_generate"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in generated] == expected["outputs"]
    choices = sorted(results["samples"]["megatrain_choice"], key=lambda s: s["doc_id"])
    for sample, doc in zip(choices, docs("choice")):  # each choice's log-likelihood, and its greedy flag
        for (logprob, greedy), choice in zip((r[0] for r in sample["resps"]), doc["choices"]):
            assert float(logprob) == pytest.approx(direct_loglikelihood(model, doc["question"].encode(),
                                                                        f" {choice}".encode()), rel=1e-5, abs=1e-4)


def test_lm_eval_cli_on_the_exported_folder(model_files, tmp_path):
    model, out = model_files
    run = subprocess.run([sys.executable, "-m", "megatrain.lm_eval", "--model", "megatrain", "--model_args",
                          f"checkpoint={out / 'folder'}", "--tasks", ",".join(NAMES), "--include_path", str(TASKS),
                          "--output_path", str(tmp_path / "results"), "--batch_size", "auto"],
                         cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]
    expected = expected_metrics(model)
    for task in NAMES:
        for metric, value in expected[task].items():
            assert results[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_long_continuations_and_empty_ones(model_files):
    """A continuation longer than seq_len is scored in consecutive windows, like megatrain.evaluate."""
    model, _ = model_files
    text = bytes(range(32, 127)) * 3  # 285 bytes: five windows of 64
    cfg = model.config
    reference = bits_per_byte(model, np.frombuffer(text, np.uint8), cfg.seq_len, cfg.patch_size)["nats"]
    (rolling, _), (empty, greedy) = loglikelihoods(model, [(b"", text), (b"context", b"")], batch_size=3)
    assert -rolling == pytest.approx(reference, rel=1e-6)
    assert empty == 0.0 and greedy
