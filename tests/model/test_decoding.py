import pytest
import torch

from megatrain.model.decoding import IncrementalDecoder, PreallocatedKVCache, uncached_next_logits
from megatrain.model.layers import KVCache

from .test_megabyte import VARIANTS, model_for


def random_context(name: str):
    """A variant's model, two sequences of seq_len random bytes and the model's logits on them."""
    cfg = VARIANTS[name]
    model = model_for(cfg)
    x = torch.randint(0, 256, (2, cfg.seq_len))
    with torch.no_grad():
        return cfg, model, x, model(x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_logits_equal_full_forward_at_every_position(name):
    cfg, model, x, full = random_context(name)
    decoder = IncrementalDecoder(model, batch_size=2)
    for t in range(cfg.seq_len):
        torch.testing.assert_close(decoder.next_logits(), full[:, t], atol=1e-4, rtol=0)
        decoder.push(x[:, t])
    with pytest.raises(ValueError, match="context is full"):
        decoder.next_logits()


def byte_by_byte(model, x: torch.Tensor) -> IncrementalDecoder:
    decoder = IncrementalDecoder(model, batch_size=x.shape[0])
    for t in range(x.shape[1]):
        decoder.next_logits()
        decoder.push(x[:, t])
    return decoder


def prompt_lengths(P: int, seq_len: int) -> list[int]:
    """Empty, one byte, mid-patch, a whole patch, past one patch (mid and whole), nearly full."""
    return [0, 1, P // 2 + 1, P, P + 1, 2 * P + P // 2, 3 * P, seq_len - 1]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_equals_uncached_and_byte_by_byte(name):
    cfg, model, x, full = random_context(name)
    for n in prompt_lengths(cfg.patch_size, cfg.seq_len):
        decoder = IncrementalDecoder(model, batch_size=2)
        decoder.prefill(x[:, :n])
        assert decoder.length == n
        logits = decoder.next_logits()
        torch.testing.assert_close(logits, uncached_next_logits(model, x[:, :n]), atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, byte_by_byte(model, x[:, :n]).next_logits(), atol=1e-4, rtol=0)
        for t in range(n, cfg.seq_len):  # the caches it left serve every later patch too
            torch.testing.assert_close(decoder.next_logits(), full[:, t], atol=1e-4, rtol=0, msg=f"n={n} t={t}")
            decoder.push(x[:, t])


def test_prefill_of_a_whole_context_then_full():
    cfg = VARIANTS["plain"]
    decoder = IncrementalDecoder(model_for(cfg))
    decoder.prefill(torch.zeros(1, cfg.seq_len, dtype=torch.long))
    with pytest.raises(ValueError, match="context is full"):
        decoder.next_logits()


def test_prefill_needs_an_empty_decoder_and_a_prompt_that_fits():
    cfg = VARIANTS["plain"]
    decoder = IncrementalDecoder(model_for(cfg))
    with pytest.raises(ValueError, match="exceeds seq_len"):
        decoder.prefill(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty decoder"):
        decoder.prefill(torch.zeros(1, 3, dtype=torch.long))


def test_uncached_next_logits():
    model = model_for(VARIANTS["plain"])
    x = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(uncached_next_logits(model, x[:, :5]), model(x)[:, 5])
        torch.testing.assert_close(uncached_next_logits(model, x[:, :0]), model(x)[:, 0])


def test_preallocated_cache_holds_what_appending_holds():
    plain, preallocated = KVCache(), PreallocatedKVCache(capacity=5)
    for length in (3, 1, 1):
        k, v = torch.randn(2, 4, length, 8), torch.randn(2, 4, length, 8)
        plain.append(k, v)
        preallocated.append(k, v)
    assert torch.equal(preallocated.k, plain.k) and torch.equal(preallocated.v, plain.v)
    with pytest.raises(ValueError, match="cache is full"):
        preallocated.append(k, v)
    with pytest.raises(TypeError, match="whole sequence"):
        preallocated.next_unit(0)
