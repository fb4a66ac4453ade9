import math
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatrain.config import load_config
from megatrain.model import Megabyte, MegabyteConfig, StageBlock, StageConfig, StageInput, bytes_loss

from .naive import naive_logits

REPO = Path(__file__).resolve().parents[2]

SMALL = MegabyteConfig(
    seq_len=32, patch_size=4, global_dim=32, global_layers=2, global_heads=2,
    local_dim=16, local_layers=2, local_heads=2, dropout=0.0, init_std=0.1,
)
VARIANTS = {
    "plain": SMALL,
    "cross_patch": replace(SMALL, cross_patch=2),
    "conv_encoder": replace(SMALL, conv_encoder=True),
    "both": replace(SMALL, cross_patch=3, conv_encoder=True),
    "untied_head": replace(SMALL, tie_local_embedding=False),
    "three_stages": replace(SMALL, seq_len=64, patch_size=8, global_dim=64,
                            mid_stages=(StageConfig(patch_size=2, dim=32, layers=1, heads=2),)),
}
VARIANTS["three_stages_cross_patch"] = replace(VARIANTS["three_stages"], cross_patch=2, conv_encoder=True)


def model_for(cfg: MegabyteConfig, seed: int = 0) -> Megabyte:
    torch.manual_seed(seed)
    return Megabyte(cfg).eval()


def fit(model: Megabyte, x: torch.Tensor, max_steps: int, stop_below: float, lr: float = 3e-3) -> float:
    """Adam on one fixed batch until the loss (nats per byte) is below stop_below; the last loss."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(max_steps):
        loss = bytes_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < stop_below:
            break
    return loss.item()


def test_contract_api_tiny_config():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    x = torch.randint(0, 256, (2, cfg.model.seq_len))
    logits = Megabyte(cfg.model)(x)
    assert logits.shape == (2, cfg.model.seq_len, 256)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_naive_equations(name):
    cfg = VARIANTS[name]
    model = model_for(cfg).double()
    x = torch.randint(0, 256, (2, cfg.seq_len))
    # byte 0 is an ordinary byte
    x[0, :5] = 0
    with torch.no_grad():
        batched = model(x)
        for b in range(x.shape[0]):
            torch.testing.assert_close(batched[b], naive_logits(model, x[b]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal(name):
    cfg = VARIANTS[name]
    model = model_for(cfg)
    x = torch.randint(0, 256, (1, cfg.seq_len))
    base = model(x)
    for t in (0, cfg.patch_size - 1, cfg.patch_size, cfg.seq_len // 2 + 1, cfg.seq_len - 2):
        y = x.clone()
        y[0, t] = (y[0, t] + 1) % 256
        out = model(y)
        assert torch.equal(out[0, : t + 1], base[0, : t + 1]), f"logits up to {t} changed"
        assert not torch.allclose(out[0, t + 1], base[0, t + 1]), f"logits at {t + 1} ignore byte {t}"


def test_first_byte_of_patch_sees_previous_patch_only_through_global_model():
    cfg, P = SMALL, SMALL.patch_size
    model = model_for(cfg)
    layers = list(model.layers)
    split = next(i for i, m in enumerate(layers) if isinstance(m, StageInput))
    x = torch.randint(0, 256, (1, cfg.seq_len))
    with torch.no_grad():
        state = x
        for layer in layers[:split]:
            state = layer(state)
        global_out = state[0]

        def local_logits(bytes_):
            s = (global_out, bytes_)
            for layer in layers[split:]:
                s = layer(s)
            return s

        k = 3  # change the last byte of patch k, holding the global model's output fixed
        y = x.clone()
        y[0, (k + 1) * P - 1] ^= 0x55
        base, changed = local_logits(x), local_logits(y)
    first_of_next = (k + 1) * P
    assert torch.equal(base[0, first_of_next], changed[0, first_of_next])
    # yet the full model does see the change there, through the global model
    assert not torch.allclose(model(x)[0, first_of_next], model(y)[0, first_of_next])


def test_short_sequences_are_padded_to_whole_patches():
    model = model_for(SMALL)
    x = torch.randint(0, 256, (2, SMALL.seq_len))
    full = model(x)
    torch.testing.assert_close(model(x[:, :7]), full[:, :7])


def test_initial_weights_have_the_configured_std_within_two_of_it():
    """Appendix A: truncated normal, std 0.006: the weights' own spread is init_std, and
    none lies beyond the cut (2 standard deviations of the normal before cutting)."""
    cfg = replace(SMALL, global_dim=256, local_dim=128, init_std=0.006)
    weights = torch.cat([p.detach().flatten() for p in model_for(cfg).parameters() if p.dim() >= 2])
    assert weights.std().item() == pytest.approx(0.006, rel=0.01)
    assert weights.abs().max().item() <= 2 * 0.006 / 0.8796256610342398 + 1e-9


def test_text_1b_config_size():
    cfg = load_config(REPO / "configs" / "megabyte-text-1b.yaml").model
    with torch.device("meta"):
        model = Megabyte(cfg)
    total = sum(p.numel() for p in model.parameters())
    global_params = sum(p.numel() for m in model.layers[: 1 + cfg.global_layers] for p in m.parameters())
    assert 0.9e9 <= total <= 1.1e9, total
    assert 0.65e9 <= global_params <= 0.8e9 and 0.2e9 <= total - global_params <= 0.3e9


def test_tiny_model_overfits_2kb_sequence():
    text = Path(textwrap.__file__).read_bytes()[:2048]
    x = torch.tensor(list(text)).unsqueeze(0)
    cfg = MegabyteConfig(seq_len=2048, patch_size=8, global_dim=128, global_layers=2, global_heads=4,
                         local_dim=64, local_layers=2, local_heads=4, dropout=0.0, init_std=0.02)
    # it takes some 110 steps; Adam's lr above about 2e-3 makes the loss spike on the way
    bits = fit(model_for(cfg), x, max_steps=400, stop_below=0.5 * math.log(2), lr=1e-3) / math.log(2)
    assert bits < 0.5, f"stuck at {bits:.3f} bits per byte after 400 steps"


def test_layers_are_flat_and_ordered():
    cfg = VARIANTS["three_stages"]
    kinds = [type(m).__name__ for m in model_for(cfg).layers]
    assert kinds == (["GlobalEmbedding"] + ["StageBlock"] * 2 + ["StageInput", "StageBlock"]
                     + ["StageInput"] + ["StageBlock"] * 2 + ["Head"])
    assert sum(isinstance(m, StageBlock) for m in model_for(cfg).layers) == 5


def test_blocks_run_a_bf16_residual_stream_under_bf16_autocast():
    """The fp32 embedding tables would otherwise make every block's input and output fp32."""
    model = Megabyte(replace(SMALL, cross_patch=0))
    seen = []
    for block in (m for m in model.layers if isinstance(m, StageBlock)):
        block.register_forward_hook(lambda _, inputs, out: seen.append((inputs[0][0].dtype, out[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 256, (2, SMALL.seq_len)))
    assert seen == [(torch.bfloat16, torch.bfloat16)] * (SMALL.global_layers + SMALL.local_layers)
