"""Multi-host launches across two network-namespace hosts (see conftest.py)."""

from __future__ import annotations

import subprocess


def test_ssh_and_pdsh_reach_both_hosts(hosts):
    for host in hosts:
        seen = subprocess.run(["ssh", host, "hostname; hostname -I"], capture_output=True, text=True, timeout=30)
        assert seen.returncode == 0, seen.stderr
        name, address = seen.stdout.split()
        assert name == host and address.startswith("10.77.0.")
    # From one host to the other, as a launcher on the first node does.
    fanned = subprocess.run(["ssh", hosts[0], f"PDSH_RCMD_TYPE=ssh pdsh -w {','.join(hosts)} hostname"], capture_output=True,
                            text=True, timeout=30)
    assert fanned.returncode == 0, fanned.stderr
    assert sorted(line.split(": ")[1] for line in fanned.stdout.splitlines()) == sorted(hosts)
