import pytest
import torch

from megatrain.model import Megabyte
from megatrain.model.decoding import IncrementalDecoder, uncached_next_logits

from .test_megabyte import VARIANTS, model_for


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_logits_equal_full_forward_at_every_position(name):
    cfg = VARIANTS[name]
    model = model_for(cfg)
    x = torch.randint(0, 256, (2, cfg.seq_len))
    with torch.no_grad():
        full = model(x)
    decoder = IncrementalDecoder(model, batch_size=2)
    for t in range(cfg.seq_len):
        torch.testing.assert_close(decoder.next_logits(), full[:, t], atol=1e-4, rtol=0)
        decoder.push(x[:, t])
    with pytest.raises(ValueError, match="context is full"):
        decoder.next_logits()


def test_uncached_next_logits():
    model = model_for(VARIANTS["plain"])
    x = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(uncached_next_logits(model, x[:, :5]), model(x)[:, 5])
        torch.testing.assert_close(uncached_next_logits(model, x[:, :0]), model(x)[:, 0])
