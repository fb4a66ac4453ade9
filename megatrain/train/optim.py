"""AdamW with the paper's recipe (Appendix A) and the learning-rate schedule."""

from __future__ import annotations

from typing import Callable

import torch
from deepspeed.runtime.utils import combine_grad_norm_groups
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
    norms, biases, embeddings (the tied output layer is one, and so is its copy on another
    pipeline stage, marked `embedding_copy`), positions or pads."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d)) and id(m.weight) not in embeddings
               and not getattr(m.weight, "embedding_copy", False)}
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


def guard_the_gradient_norm(optimizer: object, veto: torch.Tensor) -> None:
    """Make DeepSpeed's gradient norm run the same collectives on every pipeline stage, and
    come out infinite while `veto` (a device flag, alike on every rank) is set, so that the
    optimizer skips the update as it skips a non-finite one (the step guard's veto).

    The pipeline cuts anywhere, so a stage may hold no weight matrix (the Head with its
    copy of the tied embedding) and DeepSpeed drops its empty param group; yet ZeRO-1
    reduces the norm group by group over the model-parallel group, which then waits
    forever for the stage with fewer groups. Here it sums every group's squares in one
    reduction, the same total. The bf16 optimizer reduces once already, but stacks each
    rank's own norms: on a stage holding only replicated layers (the local model's)
    tensor-parallel ranks other than 0 count none and would fail on an empty stack; the
    veto's one tensor (0, or inf) is always there."""
    if hasattr(optimizer, "get_grads_for_norm"):  # DeepSpeed's bf16 optimizer
        get_grads_for_norm = optimizer.get_grads_for_norm

        def with_the_veto(for_clipping: bool = False):
            grads = get_grads_for_norm(for_clipping=for_clipping)
            if for_clipping:  # the tensors to clip, not those of the norm
                return grads
            non_expert, expert = grads
            return [*non_expert, torch.where(veto, torch.inf, 0.0)], expert

        optimizer.get_grads_for_norm = with_the_veto
    elif hasattr(optimizer, "get_grad_norm_direct"):  # ZeRO-1 (megatrain offloads nothing)
        def scaled_global_norm(norm_type: float = 2) -> torch.Tensor:
            groups = range(len(optimizer.bit16_groups))
            grads = [g for i in groups for g in optimizer.averaged_gradients[i]]
            params = [p for i in groups for p in optimizer.params_in_partition[i]]
            # a non-finite norm comes back as -1, which combining turns into inf, as DeepSpeed's own
            norm = combine_grad_norm_groups([optimizer.get_grad_norm_direct(grads, params, norm_type)], norm_type)
            return torch.where(veto, torch.inf, norm)

        optimizer.scaled_global_norm = scaled_global_norm
    else:
        raise TypeError(f"megatrain cannot guard the gradient norm of DeepSpeed's {type(optimizer).__name__}")
