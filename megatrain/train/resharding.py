"""Resume from a checkpoint of another pp x tp layout, or from `convert`'s layout-free form.

DeepSpeed's `load_checkpoint` reads its own layout only. Here each rank reads the whole
parameters of its pipeline stage's layers (`megatrain.checkpoint.read_params`), takes
its tensor-parallel shard of each (`shard_weight`) and writes it into its module and
into its ZeRO-1 partition of the fp32 weights and Adam moments through DeepSpeed's
fragment API, which addresses a parameter whole however data parallelism partitions it.
The step counts and the LR schedule come from the client state; the data position is
restored by the trainer as for any resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from megatrain.checkpoint import STATE_KEYS, CheckpointError, read_params
from megatrain.parallel import MegabytePipeline
from megatrain.parallel.pipeline import byte_input_layer, tensor_parallel_layers
from megatrain.parallel.tensor_parallel import shard_weight

MOMENTS = ("exp_avg", "exp_avg_sq")


def _create_adam_state(zero: Any, step: torch.Tensor) -> None:
    """The state AdamW creates at its first step, for every flat fp32 partition, linked to
    the parameters' fragments (DeepSpeed links them lazily, at its first step)."""
    for group, flat in zip(zero.optimizer.param_groups, zero.single_partition_of_fp32_groups):
        on_device = group.get("fused") or group.get("capturable")  # where AdamW keeps its step
        # a step tensor of its own per group: AdamW increments it in place
        own_step = step.to(flat.device if on_device else "cpu", torch.float32, copy=True)
        zero.optimizer.state[flat] = {"step": own_step, **{key: torch.zeros_like(flat) for key in MOMENTS}}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def _restore_lr_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any]) -> None:
    """The saved schedule's position. Another layout may have another number of parameter
    groups; every group has the same learning rate (they differ in weight decay only)."""
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": saved["last_epoch"],
                               "_step_count": saved["_step_count"],
                               "_last_lr": saved["_last_lr"][:1] * len(scheduler.base_lrs)})


def _this_ranks_part(module: MegabytePipeline, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of parameter `name` (a pipeline name) given whole."""
    layer, local_name = name.split(".", 1)
    if int(layer) in tensor_parallel_layers(module.config):
        return shard_weight(local_name, tensor, module.tp_rank, module.tp_size)
    return tensor  # replicated on every tensor-parallel rank


def _saved_parts(module: MegabytePipeline, tag: Path, client: dict[str, Any], keys: tuple[str, ...]
                 ) -> tuple[list[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]], torch.Tensor]:
    """Each of this rank's parameters with its part of the saved `keys`; Adam's step count."""
    params = dict(module.named_parameters())  # pipeline names: "{layer}.{name}"
    # the Head's copy of the tied local embedding: a run that held it on the embedding's
    # stage saved it once, under the embedding's name
    embedding = f"{byte_input_layer(module.config)}.byte_embed.weight"
    head_copy = f"{module.parts[-1] - 1}.out.weight"
    layers = {int(name.split(".", 1)[0]) for name in params}
    if head_copy in params:
        layers.add(byte_input_layer(module.config))
    saved = read_params(tag, layers, keys, client)
    parts = []
    for name, param in params.items():
        source = embedding if name == head_copy and f"layers.{name}" not in saved.params else name
        if f"layers.{source}" not in saved.params:
            raise CheckpointError(f"{tag}: no saved state for layers.{source}")
        parts.append((param, {key: _this_ranks_part(module, source, t) for key, t in saved.params[f"layers.{source}"].items()}))
    return parts, saved.step


def load_weights(module: MegabytePipeline, tag: Path, client: dict[str, Any]) -> None:
    """The checkpoint's fp32 weights (client: its client state) into a pipeline module of
    any layout (for evaluation)."""
    parts, _ = _saved_parts(module, tag, client, ("fp32",))
    with torch.no_grad():
        for param, part in parts:
            param.copy_(part["fp32"])


def load_resharded(engine: Any, tag: Path, client: dict[str, Any]) -> None:
    """Load the checkpoint in `tag` (client: its client state) into a pipeline engine of
    any layout, to train on."""
    parts, step = _saved_parts(engine.module, tag, client, STATE_KEYS)
    _create_adam_state(engine.optimizer, step)
    with torch.no_grad():
        for param, part in parts:
            param.copy_(part["fp32"])
            safe_set_full_fp32_param(param, part["fp32"])
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, part[key], key)
    engine.global_steps, engine.global_samples = client["global_steps"], client["global_samples"]
    engine.skipped_steps = client["skipped_steps"]
    _restore_lr_schedule(engine.lr_scheduler, client["lr_scheduler"])
