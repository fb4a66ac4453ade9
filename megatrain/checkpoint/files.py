"""A checkpoint directory: its tags, its files and how they are committed.

`DIR/latest` names the newest complete tag directory `DIR/global_stepN`. A tag holds
either DeepSpeed's files for one pp x tp x dp layout or, after `convert`, a layout-free
form (`universal.pt` and one `universal_layer_XX.pt` per layer) that any layout loads.

A save writes its files under a temporary tag (`.partial-global_stepN`); `commit` then
renames the directory and replaces `latest` atomically, so `latest` only ever names a
complete checkpoint.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

PARTIAL = ".partial-"
UNIVERSAL = "universal.pt"
DEEPSPEED = "mp_rank_00_model_states.pt"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or not megatrain's."""


def step_tag(step: int) -> str:
    return f"global_step{step}"


def partial_tag(step: int) -> str:
    return PARTIAL + step_tag(step)


def is_universal(tag: Path) -> bool:
    return (tag / UNIVERSAL).exists()


def _is_complete(tag: Path) -> bool:
    return (tag / DEEPSPEED).exists() or is_universal(tag)


def resolve_tag(ckpt: str | Path) -> Path:
    """The tag directory of a checkpoint: CKPT itself, or the one CKPT/latest names."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if _is_complete(ckpt):
        return ckpt
    latest = ckpt / "latest"
    if not latest.exists():
        raise CheckpointError(f"{ckpt}: no 'latest' file and no checkpoint files: not a checkpoint directory")
    tag = ckpt / latest.read_text().strip()
    if not _is_complete(tag):
        raise CheckpointError(f"{latest} names {tag.name}, which holds no complete checkpoint")
    return tag


def load_file(path: Path, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """A checkpoint file, read with `weights_only=True` (DeepSpeed's own loads unpickle
    anything); the few DeepSpeed classes its files hold are allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def read_client_state(tag: Path) -> dict:
    """The run's state beside the weights: its config, layout, data position, step counts
    and LR schedule (from DeepSpeed's first model-states file or the layout-free form)."""
    path = tag / (UNIVERSAL if is_universal(tag) else DEEPSPEED)
    client = load_file(path)
    if "config" not in client:
        raise CheckpointError(f"{path}: no run config: not a megatrain checkpoint")
    return client


def commit(save_dir: Path, step: int) -> None:
    """Make the complete checkpoint written under partial_tag(step) the latest (once every
    rank has written its files)."""
    partial, final = save_dir / partial_tag(step), save_dir / step_tag(step)
    for path in [*partial.iterdir(), partial]:  # on disk before anything names them
        _fsync(path)
    if final.exists():  # an older save of the same step, e.g. of a run that was stopped
        shutil.rmtree(final)
    os.replace(partial, final)
    latest = save_dir / "latest.tmp"
    latest.write_text(step_tag(step))
    _fsync(latest)
    os.replace(latest, save_dir / "latest")
    _fsync(save_dir)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
