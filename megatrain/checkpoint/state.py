"""A checkpoint's parameters, whole: fp32 weights and Adam moments, of any layout.

DeepSpeed saves, per model-parallel rank (a pipeline stage's tensor-parallel shard) and
data-parallel rank, one flat ZeRO-1 partition of the fp32 weights and moments with
`param_slice_mappings` saying where each parameter's fragment lies (elastic
checkpoints). Concatenating a parameter's fragments over the data-parallel ranks gives
its tensor-parallel shard; `merge_shards` joins those. The result is keyed by the
reference model's names (`layers.{i}.{name}`), which no layout changes, so that a run of
any layout (`megatrain.train.resharding`) or `convert` can take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from megatrain.config import build
from megatrain.model import Megabyte, MegabyteConfig, layer_specs
from megatrain.parallel.pipeline import tensor_parallel_layers
from megatrain.parallel.tensor_parallel import merge_shards

from .files import (UNIVERSAL, CheckpointError, commit, is_universal, load_file, partial_tag, read_client_state,
                    resolve_tag, step_tag)

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
# What a layout-free checkpoint keeps of the client state: the run, not DeepSpeed's internals.
CLIENT_KEYS = ("config", "layout", "data", "mixture", "dataset_fingerprint", "code_version", "global_steps",
               "global_samples", "skipped_steps", "lr_scheduler", "val_bpb", "micro_batches")


@dataclass
class SavedParams:
    """Whole parameters by reference name -> {key in STATE_KEYS: tensor}; Adam's step count."""

    params: dict[str, dict[str, torch.Tensor]]
    step: torch.Tensor


def model_config(tag: Path, client: dict | None = None) -> MegabyteConfig:
    """The model config of a tag directory (from its client state, when already read)."""
    client = read_client_state(tag) if client is None else client
    return build(MegabyteConfig, client["config"]["model"], source=f"{tag} (model config)")


def _layer_of(name: str) -> int:
    return int(name.split(".", 1)[0])


def _universal_layer(tag: Path, layer: int) -> Path:
    return tag / f"universal_layer_{layer:02d}.pt"


def _read_universal(tag: Path, layers: Iterable[int], keys: tuple[str, ...]) -> SavedParams:
    params = {}
    for layer in layers:
        path = _universal_layer(tag, layer)
        if not path.exists():
            raise CheckpointError(f"{tag}: {path.name} is missing")
        for name, state in load_file(path, mmap=True).items():
            params[f"layers.{layer}.{name}"] = {key: state[key] for key in keys}
    return SavedParams(params, load_file(tag / UNIVERSAL)["optimizer_step"])


def _param_shapes(tag: Path, mp: int, client: dict) -> dict[str, torch.Size]:
    """The shapes of one model-parallel rank's parameters, by pipeline name. Rank 0's
    model-states file is the client state, already read: these files hold weights too."""
    if mp == 0:
        states = client
    else:
        path = tag / f"mp_rank_{mp:02d}_model_states.pt"
        if not path.exists():
            raise CheckpointError(f"{tag}: {path.name} is missing")
        states = load_file(path)
    return {name: shape for group in states["param_shapes"] for name, shape in group.items()}


def _model_parallel_rank(tag: Path, mp: int, shapes: dict[str, torch.Size], dp_size: int,
                         keys: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """One model-parallel rank's parameters (by pipeline name) from its dp_size ZeRO partitions."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {name: {key: [] for key in keys} for name in shapes}
    step = None
    for dp in range(dp_size):
        path = tag / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
        if not path.exists():
            raise CheckpointError(f"{tag}: {path.name} is missing")
        zero = load_file(path)["optimizer_state_dict"]
        if "param_slice_mappings" not in zero:
            raise CheckpointError(f"{path}: no param_slice_mappings: not an elastic ZeRO checkpoint")
        for group, mapping in enumerate(zero["param_slice_mappings"]):
            moments = zero["base_optimizer_state"][group]
            flat = {"fp32": zero["single_partition_of_fp32_groups"][group],
                    "exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"]}
            step = moments["step"]
            for name, fragment in mapping.items():
                for key in keys:
                    pieces[name][key].append(flat[key].narrow(0, fragment.start, fragment.numel))
    params = {name: {key: torch.cat(parts).view(shapes[name]) for key, parts in state.items()}
              for name, state in pieces.items()}
    return params, step


def _read_deepspeed(tag: Path, cfg: MegabyteConfig, client: dict, layers: set[int],
                    keys: tuple[str, ...]) -> SavedParams:
    pp, tp, dp = (client["layout"][k] for k in ("pp", "tp", "dp"))
    sharded = tensor_parallel_layers(cfg)
    params, step = {}, None
    for stage in range(pp):
        ranks = range(stage * tp, (stage + 1) * tp)
        first = _param_shapes(tag, ranks[0], client)
        if not {_layer_of(name) for name in first} & layers:
            continue
        shapes = [first, *(_param_shapes(tag, mp, client) for mp in ranks[1:])]
        shards = [_model_parallel_rank(tag, mp, rank_shapes, dp, keys) for mp, rank_shapes in zip(ranks, shapes)]
        step = shards[0][1]
        for name in shards[0][0]:
            layer, local_name = _layer_of(name), name.split(".", 1)[1]
            if layer not in layers:
                continue
            per_rank = [s[0][name] for s in shards]
            params[f"layers.{name}"] = {
                key: merge_shards(local_name, [r[key] for r in per_rank]) if layer in sharded else per_rank[0][key]
                for key in keys}
    return SavedParams(params, step)


def read_params(tag: Path, layers: Iterable[int] | None = None, keys: tuple[str, ...] = STATE_KEYS,
                client: dict | None = None) -> SavedParams:
    """The whole parameters of `layers` (all when None) of a tag directory of any layout
    (client: its client state, when already read)."""
    client = read_client_state(tag) if client is None else client
    cfg = model_config(tag, client)
    wanted = set(range(len(layer_specs(cfg)))) if layers is None else set(layers)
    if is_universal(tag):
        return _read_universal(tag, sorted(wanted), keys)
    return _read_deepspeed(tag, cfg, client, wanted, keys)


def consolidate(ckpt: str | Path) -> tuple[MegabyteConfig, dict[str, torch.Tensor]]:
    """The model config and the reference model's fp32 state dict from a checkpoint."""
    tag = resolve_tag(ckpt)
    client = read_client_state(tag)
    cfg = model_config(tag, client)
    saved = read_params(tag, keys=("fp32",), client=client).params
    with torch.device("meta"):
        model = Megabyte(cfg)
    owners: dict[int, str] = {}  # a tied weight is saved under the first of its names
    state = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = owners.setdefault(id(param), name)
        if owner not in saved:
            raise CheckpointError(f"{tag}: no saved weights for {owner}")
        state[name] = saved[owner]["fp32"]
    return cfg, state


def load_model(ckpt: str | Path) -> Megabyte:
    """The reference model with a checkpoint's weights."""
    cfg, state = consolidate(ckpt)
    model = Megabyte(cfg)
    model.load_state_dict(state)
    return model.eval()


def convert(ckpt: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's layout-free form to the new directory `out` (its tag, and
    `latest` naming it); a run of any pp x tp x dp layout can `--load out`."""
    tag, out = resolve_tag(ckpt), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: not empty; convert writes a new checkpoint directory")
    client = read_client_state(tag)
    saved = read_params(tag, client=client)
    step = client["global_steps"]
    partial = out / partial_tag(step)
    partial.mkdir(parents=True)
    layers: dict[int, dict[str, dict[str, torch.Tensor]]] = {
        i: {} for i in range(len(layer_specs(model_config(tag, client))))}
    for name, state in saved.params.items():
        _, layer, local_name = name.split(".", 2)
        layers[int(layer)][local_name] = state
    for layer, params in layers.items():
        torch.save(params, _universal_layer(partial, layer))
    torch.save({**{key: client.get(key) for key in CLIENT_KEYS}, "optimizer_step": saved.step}, partial / UNIVERSAL)
    commit(out, step)
    return out / step_tag(step)
