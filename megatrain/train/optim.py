"""AdamW with the paper's recipe (Appendix A) and the learning-rate schedule."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from megatrain.config import TrainConfig


def lr_at(step: int, train: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup to train.lr over
    warmup_steps, then polynomial decay (power decay_power) to min_lr at total_steps."""
    if step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    done = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
    return train.min_lr + (train.lr - train.min_lr) * (1.0 - done) ** train.decay_power


def lr_schedule(train: TrainConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], LambdaLR]:
    """A LambdaLR factory for DeepSpeed (which builds it on its wrapped optimizer); its state
    is the step count, so a checkpoint resumes it and a new total_steps reshapes the decay."""

    def factor(completed_steps: int) -> float:
        return lr_at(completed_steps + 1, train, total_steps) / train.lr if train.lr else 0.0

    return lambda optimizer: LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear and convolution layers only: not on
    norms, biases, embeddings (the tied output layer is one), positions or pads."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d)) and id(m.weight) not in embeddings}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "decay", "params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # a pipeline stage may hold no matrices


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`: the fused kernel (one launch for all parameters) where they
    are on CUDA, torch's default implementation elsewhere."""
    on_cuda = all(p.device.type == "cuda" for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=train.betas,
                                  eps=train.eps, weight_decay=train.weight_decay, fused=on_cuda or None)
    # DeepSpeed's elastic ZeRO checkpoints (which resume at another dp size) require a
    # per-group "step", as its own Adam keeps; torch's AdamW keeps and restores its step per
    # parameter, so this one is only the placeholder they need.
    for group in optimizer.param_groups:
        group["step"] = 0
    return optimizer
