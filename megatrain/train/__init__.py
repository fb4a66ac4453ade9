"""Training MEGABYTE on DeepSpeed: engine setup, the loop, metrics and the command line.

- `trainer.Trainer`: one run (engine, data, loop, evaluation, checkpoint client state);
- `distributed`: joining the process group under deepspeed, mpirun, srun or plain python;
- `ds_config` / `optim`: the DeepSpeed config, AdamW groups and the LR schedule from the YAML;
- `memory`: each stage's memory estimate, and the blocks to recompute to fit a device
  (train.checkpoint_blocks: auto);
- `metrics`: the per-step JSONL, console and monitor output;
- `checkpointing`: RNG state per rank, checks before resuming, crash-safe commits, --keep-last;
- `signals`: SIGTERM / SIGUSR1 stop after the step, with a checkpoint (exit code 3);
- `cli.main`: what `launch/pretrain.py` runs.
"""

from .cli import main, parse_args, resolve_config
from .ds_config import deepspeed_config
from .optim import lr_at, param_groups
from .trainer import RunOptions, SetupError, Trainer

__all__ = ["main", "parse_args", "resolve_config", "deepspeed_config", "lr_at", "param_groups",
           "RunOptions", "SetupError", "Trainer"]
