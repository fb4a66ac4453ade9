"""The `launch/pretrain.py` command line: options of the contract on top of the YAML config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from typing import Sequence

from megatrain.config import ConfigError, DataConfig, RunConfig, load_config, parse_source
from megatrain.data.format import CorruptShardError
from megatrain.parallel import LayoutError

from .distributed import RendezvousError, leave_process_group
from .faults import EXIT_CORRUPT_DATA, EXIT_SETUP_ERROR, EXIT_STOPPED, RunFault
from .trainer import RunOptions, SetupError, Trainer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pretrain.py", description="Pretrain MEGABYTE with DeepSpeed 3D parallelism.")
    p.add_argument("--config", required=True, help="run config (YAML), e.g. configs/tiny.yaml")
    p.add_argument("--data", action="append", metavar="DIR | NAME=PATH:WEIGHT",
                   help="directory of shards and manifest.json (overrides data.path); repeat NAME=PATH:WEIGHT "
                        "to blend several by weight (shares of the training bytes; overrides data.sources)")
    p.add_argument("--pp", type=int, help="pipeline stages (overrides parallel.pp)")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks (overrides parallel.tp); "
                                          "data parallel = world size / (pp * tp)")
    p.add_argument("--train-steps", type=int, help="total optimizer steps of the run, a resumed run included")
    p.add_argument("--save", help="checkpoint directory (DeepSpeed layout)")
    p.add_argument("--save-interval", type=int, help="checkpoint every N steps (overrides train.save_interval)")
    p.add_argument("--keep-last", type=int, metavar="K", help="keep only the newest K checkpoints under --save")
    p.add_argument("--load", help="resume from the latest checkpoint in this directory (or from one tag directory)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume on a dataset with another fingerprint (from the start of its sample order)")
    p.add_argument("--metrics", help="append one JSON object per optimizer step to this file (rank 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.lr=1e-3 (repeatable)")
    p.add_argument("--seed", type=int, help="overrides train.seed")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's info messages")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The YAML config with --set overrides, then the dedicated options on top."""
    cfg = load_config(args.config, args.set)

    def given(**values: object) -> dict[str, object]:
        return {k: v for k, v in values.items() if v is not None}

    cfg = replace(cfg, data=data_options(cfg.data, args.data or []),
                  parallel=replace(cfg.parallel, **given(pp=args.pp, tp=args.tp)),
                  train=replace(cfg.train, **given(train_steps=args.train_steps, seed=args.seed,
                                                   save_interval=args.save_interval)))
    if args.keep_last is not None and args.keep_last < 1:
        raise ConfigError(f"--keep-last {args.keep_last}: keep at least one checkpoint")
    if not cfg.data.source_list():
        raise ConfigError(f"{args.config}: no training data: pass --data DIR or set data.path or data.sources")
    return cfg


def data_options(data: DataConfig, values: list[str]) -> DataConfig:
    """One plain --data DIR sets data.path; NAME=PATH:WEIGHT values set data.sources."""
    if not values:
        return data
    if len(values) == 1 and "=" not in values[0]:
        return replace(data, path=values[0], sources=())
    plain = [v for v in values if "=" not in v]
    if plain:
        raise ConfigError(f"--data {plain[0]}: with several --data, name each one (NAME=PATH:WEIGHT)")
    return replace(data, path="", sources=tuple(parse_source(v) for v in values))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deepspeed.utils import logger
    for log in (logger, *logger.handlers):  # its default level differs between DeepSpeed versions
        log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    trainer = None
    try:
        cfg = resolve_config(args)
        trainer = Trainer(cfg, RunOptions(metrics=args.metrics, save=args.save, load=args.load,
                                          keep_last=args.keep_last, allow_data_change=args.allow_data_change))
        trainer.run()
        leave_process_group()
    except (ConfigError, LayoutError, SetupError, RendezvousError, RunFault, CorruptShardError) as e:
        print(f"[rank {os.environ.get('RANK', 0)}] pretrain.py: error: {e}", file=sys.stderr, flush=True)
        leave_process_group(wait_for_peers=False)
        if isinstance(e, CorruptShardError):  # data.on_corrupt: error, met mid-run by this rank
            return EXIT_CORRUPT_DATA
        return e.exit_code if isinstance(e, RunFault) else EXIT_SETUP_ERROR
    finally:
        if trainer is not None:
            trainer.close()
    return EXIT_STOPPED if trainer.stopped else 0
