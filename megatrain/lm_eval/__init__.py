"""The `megatrain` model type of EleutherAI's lm-evaluation-harness (`pip install megatrain[eval]`).

    python -m megatrain.lm_eval --model megatrain --model_args checkpoint=PATH --tasks TASKS

or, in Python, `import megatrain.lm_eval` (which registers the type) and then
`lm_eval.simple_evaluate(model="megatrain", model_args="checkpoint=PATH", tasks=[...])`.
PATH is an exported folder or `.pt`, or a training checkpoint of any layout. lm-eval 0.4
finds external model types only once they are imported (it has no plugin entry point),
so the plain `lm_eval` command does not know this one: `python -m megatrain.lm_eval` is
that command with it registered.

Text is UTF-8 bytes, the model's vocabulary: `loglikelihood` and `loglikelihood_rolling`
score bytes (`megatrain.likelihood`; the harness turns the rolling sums into
word_perplexity, byte_perplexity and bits_per_byte), and `generate_until` decodes byte
by byte with the cached decoder, `max_gen_toks` counting bytes, cut before the first
stop string.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megatrain.likelihood import loglikelihoods
from megatrain.model.decoding import generate
from megatrain.reference import load_reference

eval_logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 16  # windows per forward; also what batch_size=auto gives
DEFAULT_GEN_BYTES = 256


@register_model("megatrain")
class MegatrainLM(LM):
    def __init__(self, checkpoint: str, batch_size: int | str | None = None, device: str | None = None,
                 max_batch_size: int | None = None, seed: int | str = 0) -> None:
        super().__init__()
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm_eval's CLI asks for cuda unless told otherwise
                eval_logger.warning(f"device {device!r} requested but no GPU is available: running on the CPU")
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_reference(checkpoint, device)
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = max_batch_size or DEFAULT_BATCH_SIZE
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size must be a number or 'auto', got {batch_size!r}") from None
        self.seed = int(seed)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(context.encode(), continuation.encode()) for context, continuation in (r.args for r in requests)]
        return loglikelihoods(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        pairs = [(b"", r.args[0].encode()) for r in requests]
        return [logprob for logprob, _ in loglikelihoods(self.model, pairs, self.batch_size)]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return [self._generate(*r.args) for r in requests]

    def _generate(self, context: str, options: dict) -> str:
        until = options.get("until") or []
        stops = [s.encode() for s in ([until] if isinstance(until, str) else until) if s]
        temperature = float(options.get("temperature", 0.0)) if options.get("do_sample", False) else 0.0
        prompt = context.encode()
        if not prompt:
            raise ValueError("generate_until needs a context of at least one byte")
        text = bytearray()
        for byte in generate(self.model, prompt, int(options.get("max_gen_toks", DEFAULT_GEN_BYTES)), temperature,
                             seed=self.seed):
            text.append(byte)
            if any(text.endswith(stop) for stop in stops):
                break
        cut = min((text.find(stop) for stop in stops if stop in text), default=len(text))
        return bytes(text[:cut]).decode("utf-8", errors="replace")
