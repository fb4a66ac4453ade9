"""Bits per byte of a model on a byte stream, as the paper measures it.

    python -m megatrain.evaluate --load MODEL --data DIR [--data NAME=DIR ...] [--split val]
        [--max-bytes N] [--strided] [--sliding W]
    deepspeed --num_gpus 8 --module megatrain.evaluate --load CKPT --data DIR --pp 2 --tp 4 ...

Every byte of the stream is predicted exactly once, from a window of at most seq_len
bytes that starts on a patch boundary:
- plain: consecutive windows of seq_len bytes;
- `--sliding W`: windows advance by W bytes and each scores only the bytes the
  previous ones did not, so every byte after the first window sees seq_len - W
  bytes of context or more;
- `--strided` (Section 2.3.3): a second pass with windows offset by P/2; each pass
  keeps the predictions of the first half of every patch, where the paper's models
  are best (loss grows along a patch as the weaker local model does more of the work).
Both can be combined (the paper's best PG-19 figure). The last line printed is a JSON
object with `bpb` and `bytes`. With several `--data` (NAME=DIR, or NAME=DIR:WEIGHT as
training takes them; the weight is not used), each source is scored alone, one JSON row
each (with `source`), and the last line is their byte-weighted mean, with `sources`
holding each one's bits per byte.

MODEL is an exported .pt or a checkpoint of any layout, run as the reference model on
one device; under a launcher (or with --pp / --tp) a checkpoint runs as the parallel
model instead, for models one device cannot hold. Both score as `megatrain.scoring` does,
as training's validation does.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatrain.config import parse_source
from megatrain.scoring import bits_per_byte, pooled


def pipeline_engine(ckpt: str, pp: int, tp: int, micro_batch_size: int) -> tuple:
    """A checkpoint (of any layout) as DeepSpeed's pipeline engine on this job's ranks
    (pp x tp x dp), evaluating micro-batches of micro_batch_size windows: (engine, run
    config, layout, this rank's coordinate)."""
    import deepspeed  # here: the reference model's evaluation needs none of it

    from megatrain.checkpoint import read_client_state, resolve_tag
    from megatrain.parallel import MegabytePipeline, plan_layout
    from megatrain.scoring.pipeline import evaluation_config
    from megatrain.train.distributed import init_distributed
    from megatrain.train.ds_config import deepspeed_config
    from megatrain.train.resharding import load_weights

    tag = resolve_tag(ckpt)
    client = read_client_state(tag)
    cfg = evaluation_config(client["config"], pp, tp, micro_batch_size, f"{tag} (run config)")
    world = init_distributed(cfg.parallel.timeout_s)
    layout = plan_layout(cfg, world.size)
    model = MegabytePipeline(cfg.model, layout, cfg.train.seed, cfg.parallel.partition_method)
    config = {**deepspeed_config(cfg, layout), "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    load_weights(engine.module, tag, client)
    return engine, cfg, layout, layout.topology().get_coord(world.rank)


def evaluate_checkpoint(ckpt: str, data_dirs: list[str], split: str, max_bytes: int | None, strided: bool,
                        sliding: int | None, pp: int, tp: int, micro_batch_size: int) -> list[dict]:
    """Bits per byte of a checkpoint (of any layout) on each data directory, run as the
    pipeline-, tensor- and data-parallel model on this job's ranks (pp x tp x dp): for
    models one device cannot hold. Every rank returns the results."""
    from megatrain.data import read_split
    from megatrain.scoring.pipeline import pipeline_bits_per_byte, plan_evaluation

    engine, cfg, layout, coord = pipeline_engine(ckpt, pp, tp, micro_batch_size)
    results = []
    for data_dir in data_dirs:
        data = read_split(data_dir, split, max_bytes, boundary=cfg.data.boundary.encode())
        plan = plan_evaluation(data, cfg.model.seq_len, cfg.model.patch_size, micro_batch_size, coord.data,
                               layout.dp, coord.pipe in (0, layout.pp - 1), strided, sliding)
        results.append(pipeline_bits_per_byte(engine, plan))
    return results


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from megatrain.data import read_split
    from megatrain.reference import load_reference
    from megatrain.train.distributed import discover_launcher, leave_process_group

    parser = argparse.ArgumentParser(prog="python -m megatrain.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="a training checkpoint (any layout) or an exported .pt")
    parser.add_argument("--data", required=True, action="append", metavar="DIR | NAME=DIR",
                        help="directory of shards and manifest.json; repeat (NAME=DIR) to score several, each alone")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-bytes", type=int, default=None, help="score the first N bytes of the split")
    parser.add_argument("--strided", action="store_true", help="two passes offset by P/2 (Section 2.3.3)")
    parser.add_argument("--sliding", type=int, default=None, metavar="W", help="sliding windows, stride W bytes")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (per micro-batch in parallel)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pp", type=int, default=None, help="run the parallel model with this many pipeline stages")
    parser.add_argument("--tp", type=int, default=None, help="... and this tensor-parallel size")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes <= 0:
        parser.error(f"--max-bytes must be positive, got {args.max_bytes}")
    try:
        sources = [parse_source(value) for value in args.data]
        if len({s.name for s in sources}) < len(sources):
            raise ValueError(f"--data: two sources share a name ({', '.join(s.name for s in sources)})")
        paths = [s.path for s in sources]
        if args.pp or args.tp or discover_launcher() != "python":
            results = evaluate_checkpoint(args.load, paths, args.split, args.max_bytes, args.strided, args.sliding,
                                          args.pp or 1, args.tp or 1, args.batch_size)
            rank = dist.get_rank()
            leave_process_group()
            if rank != 0:
                return 0
        else:
            model = load_reference(args.load, args.device)
            cfg = model.config
            results = [bits_per_byte(model, read_split(path, args.split, args.max_bytes), cfg.seq_len,
                                     cfg.patch_size, args.strided, args.sliding, args.batch_size, args.device)
                       for path in paths]
    except (OSError, ValueError) as e:
        leave_process_group(wait_for_peers=False)
        parser.error(str(e))
    settings = {"split": args.split, "strided": args.strided, "sliding": args.sliding}
    rows = []
    if len(sources) > 1:
        rows = [{"source": s.name, "bpb": r["bpb"], "bytes": r["bytes"], **settings} for s, r in zip(sources, results)]
    total = pooled(results)
    rows.append({"bpb": total["bpb"], "bytes": total["bytes"], **settings,
                 **({"sources": {s.name: r["bpb"] for s, r in zip(sources, results)}} if len(sources) > 1 else {})})
    # one write: print's two (text, newline) could let a launcher's log line in between
    sys.stdout.write("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    from megatrain.train.distributed import exit_without_teardown

    exit_without_teardown(main())
