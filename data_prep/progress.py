"""Resumable progress: an append-only JSON-lines record per rank of the work it finished."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ProgressLog:
    """`DIR/{phase}-rank{R}.jsonl`, one line {"key": ..., "value": ...} per finished item.

    A line is appended (and fsynced) only after the item's output files were renamed
    into place, so a listed item is complete. On resume the records of all ranks are
    read, whatever the number of ranks then; a line torn by a kill is ignored.
    """

    def __init__(self, directory: Path, phase: str, rank: int):
        self.directory, self.phase = directory, phase
        self.path = directory / f"{phase}-rank{rank}.jsonl"

    def finished(self) -> dict[str, Any]:
        done: dict[str, Any] = {}
        for path in sorted(self.directory.glob(f"{self.phase}-rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # the last line of a killed writer
                done[entry["key"]] = entry["value"]
        return done

    def record(self, key: str, value: Any) -> None:
        with open(self.path, "a") as f:
            # A leading newline keeps this record off the torn line a killed run may have left.
            f.write("\n" + json.dumps({"key": key, "value": value}))
            f.flush()
            os.fsync(f.fileno())
