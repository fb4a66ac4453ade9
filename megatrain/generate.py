"""Generate bytes from a trained MEGABYTE.

    python -m megatrain.generate --load MODEL --prompt TEXT --max-bytes N
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop BYTES] [--no-cache] [--out FILE]

Bytes stream to stdout (or --out) as they are made. With the same seed, the cached
decoder and `--no-cache` (the whole model rerun for every byte) give the same bytes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatrain.model.decoding import generate


def main(argv: list[str] | None = None) -> int:
    from megatrain.reference import load_reference

    parser = argparse.ArgumentParser(prog="python -m megatrain.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="a training checkpoint (any layout) or an exported .pt")
    parser.add_argument("--prompt", required=True, help="text to continue (UTF-8)")
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest bytes (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", default="", help="stop once this text has been generated")
    parser.add_argument("--no-cache", action="store_true", help="rerun the whole model for every byte")
    parser.add_argument("--out", help="write the bytes here instead of stdout")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt is empty: give at least one byte to continue")
    if args.max_bytes <= 0:
        parser.error(f"--max-bytes must be positive, got {args.max_bytes}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or not 0 <= args.top_k <= 256:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1 and 0 <= --top-k <= 256")
    try:
        model = load_reference(args.load, args.device)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        for byte in generate(model, args.prompt.encode(), args.max_bytes, args.temperature, args.top_k,
                             args.top_p, args.seed, args.stop.encode(), use_cache=not args.no_cache):
            out.write(bytes((byte,)))
            out.flush()
    finally:
        if args.out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
