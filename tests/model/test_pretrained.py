"""save_pretrained / from_pretrained: the weights back exactly, no pickle, damaged folders named."""

from __future__ import annotations

import json

import pytest
import torch

from megatrain.model import Megabyte, MegabyteConfig, StageConfig

CONFIG = MegabyteConfig(seq_len=64, patch_size=8, global_dim=64, global_layers=1, global_heads=2, local_dim=16,
                        local_layers=1, local_heads=2, mid_stages=(StageConfig(2, 32, 1, 2),), cross_patch=2)


def test_round_trip_with_no_pickle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Megabyte(CONFIG).eval()
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(torch, "load", None)  # safetensors and JSON only
    loaded = Megabyte.from_pretrained(tmp_path)
    assert loaded.config == CONFIG
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(0, 256, (2, 64))
    assert torch.equal(model(x), loaded(x))


def test_damaged_folders_are_named(tmp_path):
    Megabyte(CONFIG).save_pretrained(tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    good = config.read_text()
    config.write_text(json.dumps({**json.loads(good), "heads_typo": 3}))
    with pytest.raises(ValueError, match="config.json.*heads_typo"):
        Megabyte.from_pretrained(tmp_path)
    config.write_text(good[:20])
    with pytest.raises(ValueError, match="config.json"):
        Megabyte.from_pretrained(tmp_path)
    config.write_text(json.dumps({**json.loads(good), "local_dim": 32}))  # weights of another shape
    with pytest.raises(ValueError, match="model.safetensors"):
        Megabyte.from_pretrained(tmp_path)
    config.write_text(good)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        Megabyte.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Megabyte.from_pretrained(tmp_path)
