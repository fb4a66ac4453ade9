"""Checkpoints that never lose work: per-rank RNG state, compatibility checks before
training, and pruning.

A save writes DeepSpeed's files under a temporary tag (`.partial-global_stepN`), then
rank 0 commits it (`megatrain.checkpoint.commit`: rename, then replace `latest`
atomically), so `latest` only ever names a complete checkpoint; `--keep-last K` prunes
older ones.
"""

from __future__ import annotations

import functools
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

import megatrain
from megatrain.checkpoint import PARTIAL, CheckpointError, load_file, read_client_state, resolve_tag, step_tags
from megatrain.data.mixture import mixture_change
from megatrain.parallel import rank_stream_state, set_rank_stream_state
from megatrain.parallel.streams import STREAM


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

def device_rng_states() -> list[torch.Tensor]:
    """The generator of every accelerator device (none on CPU, whose generator is torch's):
    on a GPU dropout draws from the device's generator."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return []
    return [accelerator.get_rng_state(i) for i in range(accelerator.device_count())]


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            # numpy's state as plain tensors and numbers, loadable with weights_only=True
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "torch": torch.get_rng_state(),
            "devices": device_rng_states(),
            "rank_stream": rank_stream_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved; checkpoints from before the device generators and
    the rank stream were saved (which held the local model's stream alone) still load."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    accelerator = get_accelerator()
    for index, device_state in enumerate(state.get("devices", [])[:accelerator.device_count()]):
        accelerator.set_rng_state(device_state, index)
    rank_stream = state.get("rank_stream")
    if rank_stream is None and state.get("local_stream") is not None:
        rank_stream = {STREAM: state["local_stream"]}
    if rank_stream:
        set_rank_stream_state(rank_stream)


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
    """DeepSpeed's torch engine, loading with `weights_only=True` (`load_file`), that records
    a failed write (a full disk) instead of raising it: DeepSpeed's save has barriers between
    its writes, where the peers of a rank that raised would wait for it until the timeout.
    `Trainer.save` takes the failure once every rank is past them and agrees on it."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: Exception | None = None

    def load(self, path: str, map_location=None):
        return load_file(Path(path), map_location=map_location)

    def save(self, state_dict, path: str) -> None:
        self.guarded(lambda: super(SafeCheckpointEngine, self).save(state_dict, path), Path(path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.guarded(lambda: super(SafeCheckpointEngine, self).makedirs(path, exist_ok=exist_ok))

    def guarded(self, write: Callable[[], None], path: Path | None = None) -> None:
        """write(), unless this save has failed already; a failure is recorded and the file removed."""
        if self.failure is not None:
            return
        try:
            write()
        except (OSError, RuntimeError) as e:  # torch reports some failed writes as RuntimeError
            self.failure = e
            if path is not None:
                path.unlink(missing_ok=True)

    def take_failure(self) -> Exception | None:
        failure, self.failure = self.failure, None
        return failure


# --- checks before training ---

def saved_mixture(client: dict[str, Any]) -> list[dict]:
    """The mixture a checkpoint's run trained on; one source for those saved before mixtures."""
    if client.get("mixture"):
        return client["mixture"]
    return [{"name": None, "fingerprint": (client.get("data") or {}).get("fingerprint"), "weight": 1.0}]


def check_resumable(ckpt: str | Path, model_config: dict[str, Any], data: str | list[dict] | None,
                    allow_data_change: bool) -> Path:
    """The tag directory that `--load ckpt` resumes from; CheckpointError naming the
    mismatch if it cannot resume this run. `data`: this run's mixture records (or the
    fingerprint of its one dataset; None: not checked)."""
    tag = resolve_tag(ckpt)
    client = read_client_state(tag)
    saved = client["config"]["model"]
    differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in model_config.items()
              if saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{tag} holds another model shape ({'; '.join(differ)})")
    if data is None or allow_data_change:
        return tag
    saved = saved_mixture(client)
    now = [{"name": None, "fingerprint": data, "weight": 1.0}] if isinstance(data, str) else data
    if len(saved) == len(now) == 1:
        if saved[0]["fingerprint"] != now[0]["fingerprint"]:
            raise CheckpointError(f"{tag} was trained on dataset {saved[0]['fingerprint']!r}, --data is dataset "
                                  f"{now[0]['fingerprint']!r}: pass --allow-data-change to resume on other data "
                                  f"(from the start of its sample order)")
    elif change := mixture_change(saved, now):
        raise CheckpointError(f"{tag} was trained on another data mixture ({change}): pass --allow-data-change "
                              f"to resume on this one (from the start of its sample order)")
    return tag


# --- pruning ---

def prune(save_dir: Path, keep_last: int | None) -> None:
    """Remove what a killed save left behind and, with keep_last, all but the newest
    keep_last complete checkpoints (never the one `latest` names)."""
    for partial in save_dir.glob(PARTIAL + "*"):
        shutil.rmtree(partial, ignore_errors=True)
    if not keep_last:
        return
    latest = (save_dir / "latest").read_text().strip()
    for old in step_tags(save_dir)[keep_last:]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
