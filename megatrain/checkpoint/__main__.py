"""Checkpoint tools.

    python -m megatrain.checkpoint export CKPT OUT.pt

CKPT is a training run's `--save` directory (its `latest` tag is used) or one tag
directory in it, of any pipeline / tensor / data-parallel layout. `export` writes one
fp32 state dict plus the model config that `megatrain.reference.load_reference`
(and so `megatrain.evaluate` / `megatrain.generate`) loads into the reference
`Megabyte`. Every file is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from megatrain.config import build
from megatrain.model import Megabyte, MegabyteConfig, layer_specs
from megatrain.parallel.pipeline import first_local_layer

# How tensor parallelism splits a global block's weights (megatrain.parallel.tensor_parallel):
# column-parallel ones by output features (a fused q|k|v block by block), row-parallel
# ones by input features.
_COLUMN_PARALLEL = {"attn.qkv.weight": 3, "mlp.fc1.weight": 1}
_ROW_PARALLEL = {"attn.proj.weight", "mlp.fc2.weight"}
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or not megatrain's."""


def resolve_tag(ckpt: str | Path) -> Path:
    """The tag directory of a checkpoint: CKPT itself, or the one CKPT/latest names."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if (ckpt / "mp_rank_00_model_states.pt").exists():
        return ckpt
    latest = ckpt / "latest"
    if not latest.exists():
        raise CheckpointError(f"{ckpt}: no 'latest' file and no checkpoint files: not a checkpoint directory")
    tag = ckpt / latest.read_text().strip()
    if not (tag / "mp_rank_00_model_states.pt").exists():
        raise CheckpointError(f"{latest} names {tag.name}, which holds no complete checkpoint")
    return tag


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _merge_tensor_parallel(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0]
    if name in _COLUMN_PARALLEL:
        fused = _COLUMN_PARALLEL[name]
        blocks = [shard.chunk(fused) for shard in shards]  # per rank: its q, k, v rows
        return torch.cat([torch.cat([b[i] for b in blocks]) for i in range(fused)])
    if name in _ROW_PARALLEL:
        return torch.cat(shards, dim=1)
    return shards[0]  # replicated on every tensor-parallel rank


def read_client_state(tag: Path) -> dict:
    """What a tag directory's first model-states file holds: DeepSpeed's state and ours."""
    client = _load(tag / "mp_rank_00_model_states.pt")
    if "config" not in client:
        raise CheckpointError(f"{tag}: no run config in mp_rank_00_model_states.pt: not a megatrain checkpoint")
    return client


def consolidate(ckpt: str | Path) -> tuple[MegabyteConfig, dict[str, torch.Tensor]]:
    """The model config and the reference model's fp32 state dict from a checkpoint."""
    tag = resolve_tag(ckpt)
    client = read_client_state(tag)
    cfg = build(MegabyteConfig, client["config"]["model"], source=f"{tag} (model config)")
    files: dict[int, dict[int, Path]] = {}
    for path in tag.iterdir():
        match = _LAYER_FILE.fullmatch(path.name)
        if match:
            files.setdefault(int(match[1]), {})[int(match[2])] = path
    specs = layer_specs(cfg)
    sharded = range(1, first_local_layer(cfg))  # the global blocks; the rest is replicated
    state: dict[str, torch.Tensor] = {}
    for index, (cls, _) in enumerate(specs):
        ranks = files.get(index)
        if not ranks or sorted(ranks) != list(range(len(ranks))):
            raise CheckpointError(f"{tag}: layer {index} ({cls.__name__}) is missing or has a gap in its "
                                  f"tensor-parallel files")
        shards = [_load(ranks[r]) for r in sorted(ranks)]
        for name in shards[0]:
            parts = [s[name] for s in shards]
            merged = _merge_tensor_parallel(name, parts) if index in sharded else parts[0]
            state[f"layers.{index}.{name}"] = merged.float()
    return cfg, state


def load_model(ckpt: str | Path) -> Megabyte:
    """The reference model with a checkpoint's weights."""
    cfg, state = consolidate(ckpt)
    model = Megabyte(cfg)
    model.load_state_dict(state)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    from megatrain.reference import save_reference

    parser = argparse.ArgumentParser(prog="python -m megatrain.checkpoint", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="one fp32 state dict + config for the reference model")
    export.add_argument("ckpt", help="a --save directory or one of its tag directories")
    export.add_argument("out", help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.ckpt)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    save_reference(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"exported {resolve_tag(args.ckpt)} ({params:,} parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
