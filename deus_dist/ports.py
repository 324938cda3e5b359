"""A free TCP port on this host, for a rendezvous of processes launched here (a 2-rank test, a
study's training cell, a single-node run without MASTER_PORT)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
