"""Build zstd Arrow shards and manifest.json from files and directory trees.

    python -m data_prep.build_shards INPUT [INPUT ...] --output DIR [options]
    mpirun -n N python -m data_prep.build_shards ...     (ranks split the work)

The job runs in two stages (see data_prep.stages): each input file is parsed into
temporary part files under DIR/.build, then the shards are cut from the parts. Both
stages are spread over --workers processes on every MPI rank; the result is the same
bytes for every layout. Finished work is recorded per rank in DIR/.build, so a killed
job re-run with the same arguments picks up where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from data_prep.inputs import MODALITIES, DocOptions, InputFile, expand_inputs, group_files
from data_prep.modalities import patch_side
from data_prep.progress import ProgressLog
from data_prep.stages import BadInputError, BuildOptions, map_unit, plan_shards, write_shard
from data_prep.world import World, detect_world
from megatrain.data.format import RECORD_BATCH_BYTES, SPLITS, Manifest, ShardInfo

SKIPPED_EXAMPLES = 100  # the manifest lists this many skipped inputs; the count covers all
UNIT_BYTES, UNIT_FILES = 64 << 20, 2048  # input files are parsed in runs of at most about one shard


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.build_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directory trees")
    p.add_argument("--output", required=True, type=Path, help="dataset directory to write")
    p.add_argument("--shard-bytes", type=int, default=256 << 20, help="document bytes per shard (about)")
    p.add_argument("--batch-bytes", type=int, default=RECORD_BATCH_BYTES, help="bytes per Arrow record batch")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for the val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--zstd-level", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="processes per rank")
    p.add_argument("--modality", choices=MODALITIES, default="text")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet or datasets column holding the text")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to N x N RGB")
    p.add_argument("--patch-size", type=int, default=192, help="model patch size P: pixel blocks of sqrt(P/3)")
    p.add_argument("--strict", action="store_true", help="a bad input file, line or image is fatal")
    args = p.parse_args(argv)
    if min(args.shard_bytes, args.batch_bytes, args.workers, args.image_size) < 1 or args.seed < 0:
        p.error("--shard-bytes, --batch-bytes, --workers and --image-size must be positive, --seed >= 0")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if args.modality == "image":
        try:
            if args.image_size % patch_side(args.patch_size):
                p.error(f"--image-size {args.image_size} is not a multiple of the patch side")
        except ValueError as e:
            p.error(str(e))
    return args


def options_from(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        docs=DocOptions(args.modality, args.text_field, args.image_size, args.patch_size),
        seed=args.seed,
        val_fraction=args.val_fraction,
        shard_bytes=args.shard_bytes,
        zstd_level=args.zstd_level,
        batch_bytes=args.batch_bytes,
        strict=args.strict,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    world = detect_world()
    try:
        summary = build(args.inputs, args.output, options_from(args), args.workers, world)
    except (BadInputError, FileNotFoundError) as e:
        print(f"build_shards: error: {e}", file=sys.stderr)
        if world.size > 1:
            world.abort(1)
        return 1
    except Exception:
        if world.size == 1:
            raise
        traceback.print_exc()
        world.abort(1)  # otherwise the other ranks would wait in a collective forever
    if summary:
        print(summary)
    return 0


def build(inputs: Sequence[str], out: Path, options: BuildOptions, workers: int, world: World) -> str | None:
    """Run the job; returns the summary on rank 0."""
    started = time.monotonic()
    work = out / ".build"
    files: list[InputFile] | None = None
    if world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        files = expand_inputs(inputs, exclude=out)
        if not files:
            raise FileNotFoundError(f"no input files in {' '.join(inputs)}")
        _prepare_work_dir(work, options, files)
    files = world.bcast(files)
    (work / "parts").mkdir(parents=True, exist_ok=True)

    def report(result: dict) -> None:
        for source, reason in result["skipped"]:
            tqdm.write(f"skipped {source}: {reason}", file=sys.stderr)

    groups = group_files(files, min(UNIT_BYTES, options.shard_bytes), UNIT_FILES)
    units = _run_stage(
        world,
        ProgressLog(work, "map", world.rank),
        {
            str(i): (map_unit, (i, files[group.start : group.stop], work / "parts", options), _size(files, group))
            for i, group in enumerate(groups)
        },
        workers,
        "parsing inputs",
        report,
    )
    units_in_order = [units[str(i)] for i in range(len(groups))]
    tasks = plan_shards(units_in_order, options.shard_bytes)
    written = _run_stage(
        world,
        ProgressLog(work, "write", world.rank),
        {t.file: (write_shard, (t, work / "parts", out, options), t.approx_bytes) for t in tasks},
        workers,
        "writing shards",
    )
    if world.rank == 0:
        skipped = [{"source": s, "reason": r} for unit in units_in_order for s, r in unit["skipped"]]
        build_info = {k: v for k, v in asdict(options).items() if k != "docs"} | asdict(options.docs)
        manifest = Manifest(
            shards=tuple(ShardInfo.from_json(written[t.file]) for t in tasks if written[t.file] is not None),
            skipped=len(skipped),
            skipped_examples=tuple(skipped[:SKIPPED_EXAMPLES]),
            build=build_info | {"input_files": len(files)},
        )
        manifest.save(out)
    world.barrier()
    if world.rank != 0:
        return None
    shutil.rmtree(work)
    return _summary(out, manifest, len(files), time.monotonic() - started)


def _prepare_work_dir(work: Path, options: BuildOptions, files: list[InputFile]) -> None:
    """Keep the progress of an earlier run only if it was for the same options and inputs."""
    config = json.dumps({"options": asdict(options), "inputs": [asdict(f) for f in files]}, sort_keys=True)
    digest = hashlib.sha256(config.encode()).hexdigest()
    stamp = work / "config.sha256"
    if stamp.exists() and stamp.read_text() == digest:
        print(f"build_shards: resuming the unfinished build in {work}", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stamp.write_text(digest)


def _size(files: list[InputFile], group: range) -> int:
    return sum(max(0, files[i].size) for i in group)


Job = tuple[Callable[..., Any], tuple, int]  # (function, arguments, bytes for the progress bar)


def _run_stage(
    world: World,
    log: ProgressLog,
    jobs: dict[str, Job],
    workers: int,
    label: str,
    report: Callable[[Any], None] = lambda result: None,
) -> dict[str, Any]:
    """Run this rank's share of `jobs` (every size-th, by key order) not finished before;
    returns every rank's results by key."""
    finished = log.finished()
    mine = {key: job for n, (key, job) in enumerate(jobs.items()) if n % world.size == world.rank}
    results = {key: finished[key] for key in mine if key in finished}
    todo = {key: job for key, job in mine.items() if key not in results}
    total = sum(nbytes for _, _, nbytes in todo.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
               disable=world.rank != 0)
    with bar:
        for key, result in _run_jobs(todo, workers):
            log.record(key, result)
            results[key] = result
            report(result)
            bar.update(todo[key][2])
    merged: dict[str, Any] = {}
    for part in world.allgather(results):
        merged.update(part)
    return merged


def _run_jobs(jobs: dict[str, Job], workers: int) -> Iterator[tuple[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        for key, (function, arguments, _) in jobs.items():
            yield key, function(*arguments)
        return
    # spawn, not fork: forking a process that may hold MPI or threads is unsafe.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(function, *arguments): key for key, (function, arguments, _) in jobs.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _summary(out: Path, manifest: Manifest, inputs: int, seconds: float) -> str:
    lines = [f"build_shards: {inputs} input files -> {out} in {seconds:.1f} s"]
    for split in SPLITS:
        shards = manifest.split_shards(split)
        docs, nbytes = sum(s.docs for s in shards), sum(s.bytes for s in shards)
        lines.append(f"  {split:5s}: {docs:,} documents, {nbytes:,} bytes in {len(shards)} shards")
    lines.append(f"  skipped: {manifest.skipped:,} inputs" + (" (listed in manifest.json)" if manifest.skipped else ""))
    lines.extend(f"    {e['source']}: {e['reason']}" for e in manifest.skipped_examples[:10])
    lines.append(f"  fingerprint: {manifest.fingerprint}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
