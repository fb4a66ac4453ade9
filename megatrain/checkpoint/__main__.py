"""Checkpoint tools.

    python -m megatrain.checkpoint export CKPT OUT.pt
    python -m megatrain.checkpoint export CKPT DIR        (or --format safetensors)
    python -m megatrain.checkpoint convert CKPT OUT
    python -m megatrain.checkpoint verify DIR

CKPT is a training run's `--save` directory (its `latest` tag is used) or one tag
directory in it, of any pipeline / tensor / data-parallel layout. `export` writes one
fp32 state dict plus the model config that `megatrain.reference.load_reference`
(and so `megatrain.evaluate` / `megatrain.generate`) loads into the reference
`Megabyte`; to a folder (any OUT not ending in `.pt`, or `--format safetensors`) it
writes `model.safetensors`, `config.json` and a `README.md` model card, a folder to
publish as it is, which `Megabyte.from_pretrained(DIR)` loads without pickle. `convert` writes the whole training state (fp32 weights, Adam moments,
step counts, LR schedule, data position) in a layout-free form to the new directory
OUT, which `launch/pretrain.py --load OUT` resumes at any --pp / --tp / data-parallel
size. (`--load` also reads another layout's checkpoint directly; `convert` makes the
checkpoint independent of the layout and of DeepSpeed's file format.) Every file is
read with `torch.load(weights_only=True)`. `verify` checks each tag of DIR (or the one
tag DIR) against the sizes and checksums recorded when it was saved, naming each damaged
file, and exits 1 if any is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import convert, damaged_files, load_model, resolve_tag, step_tags
from .files import CHECKSUMS
from .publish import export_pretrained


def main(argv: list[str] | None = None) -> int:
    from megatrain.reference import save_reference

    parser = argparse.ArgumentParser(prog="python -m megatrain.checkpoint", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="one fp32 state dict + config for the reference model")
    export.add_argument("ckpt", help="a --save directory or one of its tag directories")
    export.add_argument("out", help="the .pt file, or the folder, to write")
    export.add_argument("--format", choices=("pt", "safetensors"), default=None,
                        help="default: pt when OUT ends in .pt, else safetensors (a folder)")
    layout_free = commands.add_parser("convert", help="the training state in a form any layout can --load")
    layout_free.add_argument("ckpt", help="a --save directory or one of its tag directories")
    layout_free.add_argument("out", help="the new checkpoint directory to write")
    check = commands.add_parser("verify", help="check every tag's files against their recorded checksums")
    check.add_argument("ckpt", help="a --save directory or one of its tag directories")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.ckpt)
    try:
        tag = resolve_tag(args.ckpt)
        if args.command == "convert":
            print(f"converted {tag} to {convert(tag, args.out)}: "
                  f"launch/pretrain.py --load {args.out} resumes it at any --pp / --tp / data-parallel size")
            return 0
        if (args.format or ("pt" if args.out.endswith(".pt") else "safetensors")) == "safetensors":
            model = export_pretrained(tag, args.out)
        else:
            model = load_model(tag)
            save_reference(model, args.out)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    params = sum(p.numel() for p in model.parameters())
    print(f"exported {tag} ({params:,} parameters) to {args.out}")
    return 0


def verify(ckpt: str) -> int:
    """0 when every tag of ckpt is intact, else 1; one line per tag, one per damaged file."""
    root = Path(ckpt)
    tags = [root] if (root / CHECKSUMS).exists() else step_tags(root) if root.is_dir() else []
    if not tags:
        print(f"{ckpt}: no checkpoint tags", file=sys.stderr)
        return 1
    damaged = 0
    for tag in tags:
        if not (tag / CHECKSUMS).exists():
            print(f"{tag}: not verifiable (no {CHECKSUMS}: saved before checksums were recorded)")
            continue
        problems = damaged_files(tag)
        damaged += bool(problems)
        print(f"{tag}: {'DAMAGED' if problems else 'ok'}")
        for problem in problems:
            print(f"  {problem}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
