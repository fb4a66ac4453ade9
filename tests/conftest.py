"""Session fixtures every test folder shares (defined here once, so each runs once per session).

- `cpu_comm` builds DeepSpeed's shared-memory comm op once before any multi-rank run
  (every rank building it at once can crash a fresh machine), with this venv's ninja;
- `tiny_shards` builds a small dataset with `data_prep.build_shards`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import CPU_ENV, REPO

# Every process this session starts finds this venv's ninja first: DeepSpeed builds its CPU
# comm op with the first ninja on PATH, and the system's (another version) takes the venv's
# build for stale and rebuilds it, about 50 s, then the venv's takes that one for stale.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def cpu_comm() -> None:
    """Build DeepSpeed's CPU comm op once, before any rank of any test needs it (in a
    process of its own: this one's accelerator is left alone)."""
    subprocess.run([sys.executable, "-c", "from megatrain.train.distributed import build_cpu_comm_op; "
                    "build_cpu_comm_op()"], env={**os.environ, **CPU_ENV}, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train and val shards of some of the standard library's .py files (bytes every machine has)."""
    stdlib = Path(json.__file__).parents[1]
    files = sorted(str(p) for pkg in ("json", "email", "asyncio", "collections") for p in (stdlib / pkg).glob("*.py"))
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "-m", "data_prep.build_shards", *files, "--output", str(out),
                    "--val-fraction", "0.1", "--seed", "0"], cwd=REPO, check=True, capture_output=True)
    return out
