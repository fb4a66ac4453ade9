"""The single-device reference model on disk: one fp32 state dict plus its config.

This is what `python -m megatrain.checkpoint export` writes (a `.pt` file, or a
safetensors folder: `Megabyte.from_pretrained`) and what evaluation, generation and
the lm-eval model load. Files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatrain.config import ConfigError, build, config_to_dict
from megatrain.model import Megabyte, MegabyteConfig
from megatrain.model.megabyte import CONFIG_FILE


def save_reference(model: Megabyte, path: str | Path) -> None:
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": config_to_dict(model.config), "model": state}, path)


def load_reference(path: str | Path, device: str | torch.device = "cpu") -> Megabyte:
    """Load an exported model file or folder, or a training checkpoint directory of any layout."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if (path / CONFIG_FILE).is_file():
        return Megabyte.from_pretrained(path, device)
    if path.is_dir():
        from megatrain.checkpoint import load_model

        return load_model(path).to(device)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"config", "model"} <= blob.keys():
        raise ConfigError(f"{path}: not a megatrain model file (needs 'config' and 'model')")
    cfg = build(MegabyteConfig, blob["config"], source=str(path))
    model = Megabyte(cfg)
    model.load_state_dict(blob["model"])
    return model.to(device).eval()
