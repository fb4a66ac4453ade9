"""A checkpoint as a folder to publish: `model.safetensors`, `config.json` and a
`README.md` model card (what `python -m megatrain.checkpoint export CKPT DIR` writes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatrain.model import Megabyte

from .files import read_client_state, resolve_tag
from .state import load_model


def export_pretrained(ckpt: str | Path, out: str | Path) -> Megabyte:
    """Write a checkpoint's model to the folder `out`; the model card says where it came from."""
    tag, out = resolve_tag(ckpt), Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    client = read_client_state(tag)
    model = load_model(tag)
    model.save_pretrained(out)
    (out / "README.md").write_text(model_card(model, client, tag.name))
    return model


def model_card(model: Megabyte, client: dict, tag: str) -> str:
    """The model card: what the model is, its config, the data and steps it was trained on."""
    params = sum(p.numel() for p in model.parameters())
    val_bpb = client.get("val_bpb")
    rows = [("parameters", f"{params:,}"), ("training steps", client.get("global_steps", "unknown")),
            ("training samples", client.get("global_samples", "unknown")),
            ("dataset fingerprint", f"`{client.get('dataset_fingerprint') or 'unknown'}`"),
            ("validation bits per byte", f"{val_bpb:.4f}" if val_bpb is not None else "not measured"),
            ("checkpoint", f"`{tag}`"), ("code version", f"`{client.get('code_version') or 'unknown'}`")]
    config = [(f.name, f"`{getattr(model.config, f.name)}`") for f in dataclasses.fields(model.config)]
    lines = ["---", "library_name: megatrain", "tags: [megabyte, byte-level, tokenizer-free]", "---", "",
             "# MEGABYTE byte-level language model", "",
             "A MEGABYTE model (Yu et al. 2023, arXiv 2305.07185) trained with megatrain: it reads and",
             "writes raw UTF-8 bytes, with no tokenizer. Load it with", "",
             "```python", "from megatrain.model import Megabyte", "model = Megabyte.from_pretrained(\"PATH\")", "```",
             "", "or evaluate it with `python -m megatrain.evaluate --load PATH --data SHARDS` and",
             "`lm_eval --model megatrain --model_args checkpoint=PATH --tasks ...`.", "", "## Training", "",
             *_table(("", ""), rows), "", "## Model config", "", *_table(("field", "value"), config), ""]
    return "\n".join(lines)


def _table(header: tuple[str, str], rows: list[tuple[str, object]]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]
