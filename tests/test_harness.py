"""The multi-process harness itself: a port taken between free_port and the rendezvous."""

from __future__ import annotations

import socket

import torch.distributed as dist

from tests import distributed


def world(rank: int, world_size: int) -> int:
    return dist.get_world_size()


def test_run_ranks_starts_again_on_a_new_port_when_its_port_is_taken(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        fresh = distributed.free_port
        monkeypatch.setattr(distributed, "free_port", lambda: ports.pop() if ports else fresh())
        assert distributed.run_ranks(world, 2) == [2, 2]
        assert not ports  # the taken port was tried first
