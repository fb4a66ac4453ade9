"""Log-likelihoods of byte strings given a context, batched: what downstream evaluations
ask a language model for (lm-eval's `loglikelihood` and `loglikelihood_rolling`).

A string is scored from windows of at most seq_len bytes that start on its first byte
or a whole number of windows before its end, as `megatrain.evaluate` scores a stream:
a string that fits is one window; a longer one is scored in consecutive windows, each
predicting its bytes once; a context longer than the model's is cut on the left
(what a continuation of seq_len bytes or fewer sees is the last seq_len bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from megatrain.model import Megabyte

UNSCORED = -100  # a target no prediction is scored on


@dataclass(frozen=True)
class _Window:
    request: int
    data: torch.Tensor  # int64 [n], n <= seq_len
    targets: torch.Tensor  # int64 [n]: the bytes scored, UNSCORED elsewhere


def _windows(request: int, data: bytes, first: int, seq_len: int) -> list[_Window]:
    """Windows that predict bytes first..len(data) once each, the last ending at the end."""
    count = max(1, math.ceil((len(data) - first) / seq_len))
    windows = []
    for start in range(max(0, len(data) - count * seq_len), len(data), seq_len):
        x = torch.tensor(list(data[start:start + seq_len]), dtype=torch.long)
        targets = x.clone()
        targets[:max(0, first - start)] = UNSCORED
        if (targets != UNSCORED).any():
            windows.append(_Window(request, x, targets))
    return windows


@torch.no_grad()
def loglikelihoods(model: Megabyte, requests: Sequence[tuple[bytes, bytes]],
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """(log-likelihood in nats of `continuation` given `context`, whether greedy decoding
    would produce it byte for byte) for each (context, continuation)."""
    device = next(model.parameters()).device
    windows = [w for i, (context, continuation) in enumerate(requests)
               for w in _windows(i, context + continuation, len(context), model.config.seq_len)]
    windows.sort(key=lambda w: -len(w.data))  # similar lengths share a batch: little padding
    logprob, greedy = [0.0] * len(requests), [True] * len(requests)
    for b in range(0, len(windows), batch_size):
        batch = windows[b:b + batch_size]
        x = torch.zeros(len(batch), len(batch[0].data), dtype=torch.long)
        targets = torch.full_like(x, UNSCORED)
        for row, w in enumerate(batch):  # padding on the right: causality keeps it out of the scores
            x[row, :len(w.data)], targets[row, :len(w.data)] = w.data, w.targets
        logits = model(x.to(device)).float()
        targets = targets.to(device)
        scored = targets != UNSCORED
        picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (picked.double() * scored).sum(1).tolist()
        hits = ((logits.argmax(-1) == targets) | ~scored).all(1).tolist()
        for w, total, hit in zip(batch, sums, hits):
            logprob[w.request] += total
            greedy[w.request] &= hit
    return list(zip(logprob, greedy))
