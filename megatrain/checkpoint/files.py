"""A checkpoint directory: its tags, its files and how they are committed.

`DIR/latest` names the newest complete tag directory `DIR/global_stepN`. A tag holds
either DeepSpeed's files for one pp x tp x dp layout or, after `convert`, a layout-free
form (`universal.pt` and one `universal_layer_XX.pt` per layer) that any layout loads.

A save writes its files under a temporary tag (`.partial-global_stepN`); `commit` then
records every file's size and xxh3 checksum (`checksums.json`), renames the directory and
replaces `latest` atomically, so `latest` only ever names a complete checkpoint.
`resolve_tag(..., verify=True)` checks them: a damaged `latest` falls back to the newest
intact tag, a damaged tag named explicitly is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import xxhash

PARTIAL = ".partial-"
UNIVERSAL = "universal.pt"
DEEPSPEED = "mp_rank_00_model_states.pt"
CHECKSUMS = "checksums.json"
HASH_CHUNK = 8 << 20
_STEP_TAG = re.compile(r"global_step(\d+)")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or not megatrain's."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files differ from their recorded sizes or checksums, with no
    intact one to fall back to."""


def step_tag(step: int) -> str:
    return f"global_step{step}"


def partial_tag(step: int) -> str:
    return PARTIAL + step_tag(step)


def is_universal(tag: Path) -> bool:
    return (tag / UNIVERSAL).exists()


def _is_complete(tag: Path) -> bool:
    return (tag / DEEPSPEED).exists() or is_universal(tag)


def file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_checksums(tag: Path) -> None:
    """Write the size and checksum of every file of a tag directory to its checksums.json."""
    files = {p.name: {"size": p.stat().st_size, "xxh3_64": file_checksum(p)}
             for p in sorted(tag.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (tag / CHECKSUMS).write_text(json.dumps(files, indent=1))


def damaged_files(tag: Path) -> list[str]:
    """What is wrong with each file of a tag that differs from its record; empty when all are
    intact, or when the tag has no record (a checkpoint from before they were kept)."""
    record = tag / CHECKSUMS
    if not record.exists():
        return []
    try:
        files = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        return [f"{record}: unreadable ({e})"]
    problems = []
    for name, saved in files.items():
        path = tag / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (size := path.stat().st_size) != saved["size"]:
            problems.append(f"{path}: {size} bytes, {saved['size']} when saved (truncated?)")
        elif file_checksum(path) != saved["xxh3_64"]:
            problems.append(f"{path}: checksum differs from the one recorded when saved (corrupt)")
    return problems


def step_tags(ckpt: Path) -> list[Path]:
    """The committed tag directories of a checkpoint directory, newest first."""
    steps = [(int(m[1]), p) for p in ckpt.iterdir() if (m := _STEP_TAG.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps, reverse=True)]


def resolve_tag(ckpt: str | Path, verify: bool = False) -> Path:
    """The tag directory of a checkpoint: CKPT itself, or the one CKPT/latest names.

    With verify, the files are checked against their checksums: a damaged tag named
    explicitly is refused; a damaged `latest` gives way, with a warning, to the newest
    intact tag before it."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if _is_complete(ckpt):
        if verify and (damage := damaged_files(ckpt)):
            raise DamagedCheckpointError(f"{ckpt} is damaged: {'; '.join(damage)}")
        return ckpt
    latest = ckpt / "latest"
    if not latest.exists():
        raise CheckpointError(f"{ckpt}: no 'latest' file and no checkpoint files: not a checkpoint directory")
    tag = ckpt / latest.read_text().strip()
    if not _is_complete(tag):
        raise CheckpointError(f"{latest} names {tag.name}, which holds no complete checkpoint")
    if not verify or not (damage := damaged_files(tag)):
        return tag
    for older in step_tags(ckpt):
        if older.name != tag.name and _is_complete(older) and not damaged_files(older):
            print(f"warning: {tag} is damaged ({'; '.join(damage)}): loading {older.name}, the newest intact "
                  f"checkpoint, instead", file=sys.stderr, flush=True)
            return older
    raise DamagedCheckpointError(f"{tag} is damaged ({'; '.join(damage)}) and no older checkpoint in {ckpt} is intact")


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
    record_checksums(partial)
    for path in [*partial.iterdir(), partial]:  # on disk before anything names them
        _fsync(path)
    if final.exists():  # an older save of the same step, e.g. of a run that was stopped
        shutil.rmtree(final)
    os.replace(partial, final)
    latest = save_dir / "latest.tmp"
    try:
        latest.write_text(step_tag(step))
        _fsync(latest)
        os.replace(latest, save_dir / "latest")
    except OSError:  # e.g. a full disk: `latest` still names the previous checkpoint
        latest.unlink(missing_ok=True)
        raise
    _fsync(save_dir)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
