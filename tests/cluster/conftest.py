"""The real cluster components, started once per test session (root only).

- `slurm`: a one-node Slurm cluster (munge, slurmctld, slurmd; setup_slurm.sh); the
  value is the environment that points Slurm's commands at it.
- `hosts`: two hosts made of network namespaces, each with sshd (netns_hosts.sh);
  the value is their names, reachable over ssh (and pdsh) from here and from each other.

Both scripts install the Debian packages they need and are idempotent; the session's
end stops what they started. Without root the tests skip, saying why; under CI
(CI=true) a missing root is a failure instead, so that they cannot silently vanish.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def require_root() -> None:
    if os.geteuid() == 0:
        return
    why = "the cluster tests install and start Slurm, munge and sshd in network namespaces: they need root"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true, so they may not skip)")
    pytest.skip(why)


def _service(script: str, request: pytest.FixtureRequest) -> str:
    require_root()
    path = str(HERE / script)
    request.addfinalizer(lambda: subprocess.run([path, "stop"], check=False))
    started = subprocess.run([path, "start"], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.fail(f"{script} start failed:\n{started.stdout}{started.stderr}")
    return started.stdout


@pytest.fixture(scope="session")
def slurm(request: pytest.FixtureRequest) -> dict[str, str]:
    conf = _service("setup_slurm.sh", request).strip()
    # What a job needs: our Slurm, this very venv on every node, CPU DeepSpeed with one
    # thread per rank (the tasks share two cores).
    return {**os.environ, "SLURM_CONF": conf, "MEGATRAIN_VENV": sys.prefix, "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def hosts(request: pytest.FixtureRequest) -> list[str]:
    return _service("netns_hosts.sh", request).split()
