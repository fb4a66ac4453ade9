"""The DeepSpeed config of a run, generated from its YAML config."""

from __future__ import annotations

from typing import Any

from megatrain.config import RunConfig
from megatrain.parallel import Layout, pipeline_cut, replicated_activations_only

MONITOR_KEYS = {"tensorboard": "tensorboard", "csv": "csv_monitor", "wandb": "wandb"}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, section by section (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: RunConfig, layout: Layout) -> dict[str, Any]:
    """ZeRO-1 over data parallelism, bf16 weights with fp32 gradient accumulation (or plain
    fp32), gradient clipping and the DeepSpeed monitors; `train.deepspeed` is merged last."""
    t = cfg.train
    config: dict[str, Any] = {
        "train_batch_size": t.sequences_per_step(layout.dp),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.accumulation_steps(layout.dp),
        "gradient_clipping": t.grad_clip,
        # elastic: the optimizer state is saved whole, so a run can resume at another dp size
        "zero_optimization": {"stage": 1, "elastic_checkpoint": True},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # megatrain logs each step itself
        # and times it: DeepSpeed's throughput timer would synchronize the device every micro-batch
        "timers": {"throughput": {"enabled": False}},
    }
    if layout.tp > 1 and not replicated_activations_only(
            cfg.model, pipeline_cut(cfg.model, cfg.parallel.partition_method, layout.pp)):
        # the patch-split local model crosses a stage: each tensor-parallel rank sends its own
        # patches, not the slice of a replicated activation that pipe_partitioned assumes
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if t.precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    for name in t.monitor:
        config[MONITOR_KEYS[name]] = {"enabled": True, "output_path": t.monitor_dir, "job_name": "megatrain"}
    return merge(config, t.deepspeed)
