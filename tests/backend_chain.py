"""Helpers of the backend test suites around a stream driven by direct gateway calls
(``scistream_prefect.LocalPair``): impostors, checksums, a round-robin transfer.

The calls are the real gateway functions through ``LocalGateway`` (Globus Compute
serializer, worker processes, SQLite); the proxies are the real backends.
"""

from __future__ import annotations

import datetime
import json
import socket
import uuid
from pathlib import Path

from scistream_prefect import LocalPair
from scistream_proxy.backends import BACKENDS
from scistream_proxy.leaks import port_is_free
from scistream_proxy.tls import generate_certificate

MIB = 1 << 20


def skip_reason(name: str) -> str | None:
    """Why backend ``name`` cannot be tested here (its binary or engine is missing)."""
    reason = BACKENDS[name].unavailable_reason()
    return f"backend {name} is not usable on this machine: {reason}" if reason else None


def impostor(tmp_path: Path) -> tuple[str, str]:
    """A certificate (and fingerprint) nobody in the chain holds the key of... except
    the test, which is what an impostor is."""
    directory = tmp_path / f"impostor-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    return generate_certificate("impostor", directory / "key.pem", directory / "cert.pem",
                                datetime.timedelta(days=1))


def digests(results: list[dict]) -> list[tuple[int, str]]:
    return sorted((r.get("bytes", -1), r.get("sha256", r.get("error", ""))) for r in results)


def holds_port(address: str) -> bool:
    return not port_is_free(address)


def connect_early(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=30)


def status_line(status: dict) -> str:
    return json.dumps({k: status.get(k) for k in ("state", "alive", "bytes", "proxy_detail")})


def round_robin_transfer(producer, consumer, producer_app, tls: bool, while_connected=None):
    """A checksummed transfer over 3 connections, round robin over two producer apps
    (connections 0 and 2 to the first, 1 to the second), then released. Checks the
    data and that both ends were CONNECTED and alive; returns ``(chain, statuses,
    seen)``, ``seen`` being what ``while_connected()`` returned while the stream ran."""
    from conftest import run_consumer

    total = 24 * MIB
    apps = [producer_app(2, total // 2), producer_app(1, total // 4)]
    chain = LocalPair(producer, consumer).reserve(3)
    try:
        chain.connect([apps[0].listeners[0], apps[1].listeners[0]], tls=tls)
        seen = while_connected() if while_connected else None
        code, received = run_consumer(chain.cons["listeners"])
        sent = apps[0].result() + apps[1].result()
        statuses = chain.status()
    finally:
        chain.release()
    assert code == 0, received
    assert digests(received) == digests(sent)
    assert sum(r["bytes"] for r in received) == total * 3 // 4
    for status in statuses:
        assert status["state"] == "CONNECTED" and status["alive"] is True, status_line(status)
    return chain, statuses, seen
