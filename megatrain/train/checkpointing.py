"""Checkpoints that never lose work: per-rank RNG state, compatibility checks before
training, and commits that a `kill -9` cannot leave half-done.

A save writes DeepSpeed's files under a temporary tag (`.partial-global_stepN`), then
rank 0 renames the directory to `global_stepN` and replaces `latest` atomically, so
`latest` only ever names a complete checkpoint; `--keep-last K` prunes older ones.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

import megatrain
from megatrain.checkpoint import CheckpointError, read_client_state, resolve_tag
from megatrain.parallel import MegabytePipeline

PARTIAL = ".partial-"
_STEP_TAG = re.compile(r"global_step(\d+)")


def step_tag(step: int) -> str:
    return f"global_step{step}"


@functools.cache
def code_version() -> dict[str, str | None]:
    """The package version and, in a git checkout, the commit the code came from."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(megatrain.__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"megatrain": megatrain.__version__, "git": commit}


# --- RNG state of one rank: saved beside DeepSpeed's files, one small file per rank ---

def rng_state(model: MegabytePipeline) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            # numpy's state as plain tensors and numbers, loadable with weights_only=True
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "torch": torch.get_rng_state(),
            "local_stream": model.local_stream.state if model.local_stream is not None else None}


def set_rng_state(model: MegabytePipeline, state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if model.local_stream is not None and state["local_stream"] is not None:
        model.local_stream.state = state["local_stream"]


def rng_file(tag_dir: Path, stage: int, tp_rank: int, dp_rank: int) -> Path:
    return tag_dir / f"rng_pp{stage:02d}_tp{tp_rank:02d}_dp{dp_rank:03d}.pt"


def load_rng_file(tag_dir: Path, stage: int, tp_rank: int, dp_rank: int) -> dict[str, Any] | None:
    """This rank's RNG state; at another data-parallel size, that of data-parallel rank 0 of
    the same stage and tensor-parallel rank (every data-parallel rank starts alike)."""
    for path in (rng_file(tag_dir, stage, tp_rank, dp_rank), rng_file(tag_dir, stage, tp_rank, 0)):
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
    return None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, loading with `weights_only=True` (DeepSpeed's own loads
    unpickle anything); the few DeepSpeed classes its files hold are allowed by name."""

    def load(self, path: str, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)


# --- checks before training ---

def check_resumable(ckpt: str, model_config: dict[str, Any], pp: int, tp: int,
                    fingerprint: str | None, allow_data_change: bool) -> Path:
    """The tag directory that `--load ckpt` resumes from; CheckpointError naming the
    mismatch if it cannot resume this run."""
    tag = resolve_tag(ckpt)
    client = read_client_state(tag)
    saved = client["config"]["model"]
    differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in model_config.items()
              if saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{tag} holds another model shape ({'; '.join(differ)})")
    layout = client.get("layout", {})
    if (layout.get("pp"), layout.get("tp")) != (pp, tp):
        raise CheckpointError(f"{tag} was saved at pp={layout.get('pp')} x tp={layout.get('tp')}, this run is "
                              f"pp={pp} x tp={tp}: resume it with --pp {layout.get('pp')} --tp {layout.get('tp')} "
                              f"(any data-parallel size works; `python -m megatrain.checkpoint export` gives its "
                              f"weights for any layout)")
    saved_fingerprint = (client.get("data") or {}).get("fingerprint")
    if fingerprint is not None and saved_fingerprint != fingerprint and not allow_data_change:
        raise CheckpointError(f"{tag} was trained on dataset {saved_fingerprint!r}, --data is dataset "
                              f"{fingerprint!r}: pass --allow-data-change to resume on other data "
                              f"(from the start of its sample order)")
    return tag


# --- commits ---

def partial_tag(step: int) -> str:
    return PARTIAL + step_tag(step)


def commit(save_dir: Path, step: int) -> None:
    """Make the complete checkpoint written under partial_tag(step) the latest (rank 0,
    after every rank has written its files)."""
    final = save_dir / step_tag(step)
    if final.exists():  # an older save of the same step, e.g. of a run that was stopped
        shutil.rmtree(final)
    os.replace(save_dir / partial_tag(step), final)
    latest = save_dir / "latest.tmp"
    with open(latest, "w") as f:
        f.write(step_tag(step))
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest, save_dir / "latest")
    _fsync_dir(save_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(save_dir: Path, keep_last: int | None) -> None:
    """Remove what a killed save left behind and, with keep_last, all but the newest
    keep_last complete checkpoints (never the one `latest` names)."""
    for partial in save_dir.glob(PARTIAL + "*"):
        shutil.rmtree(partial, ignore_errors=True)
    if not keep_last:
        return
    latest = (save_dir / "latest").read_text().strip()
    steps = sorted((int(m[1]), p) for p in save_dir.iterdir() if (m := _STEP_TAG.fullmatch(p.name)))
    for _, old in steps[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
