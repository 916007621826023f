"""A two-gateway chain driven by direct gateway calls, for the backend test suites.

The calls are the real gateway functions through ``LocalGateway`` (Globus Compute
serializer, worker processes, SQLite); the proxies are the real backends.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scistream_proxy.backends import BACKENDS
from scistream_proxy.leaks import port_is_free, proxy_pids
from scistream_proxy.tls import generate_certificate

MIB = 1 << 20


def skip_reason(name: str) -> str | None:
    """Why backend ``name`` cannot be tested here (its binary or engine is missing)."""
    reason = BACKENDS[name].unavailable_reason()
    return f"backend {name} is not usable on this machine: {reason}" if reason else None


@dataclass
class Chain:
    producer: object
    consumer: object
    uid: str
    key: str
    prod: dict
    cons: dict

    def status(self) -> tuple[dict, dict]:
        return (self.producer.call("status", {"uid": self.uid}),
                self.consumer.call("status", {"uid": self.uid}))

    def release(self) -> None:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(gw.call, "release", {"uid": self.uid})
                           for gw in (self.producer, self.consumer)]:
                future.result()


def reserve_pair(producer, consumer, num_conn: int, rate: int = 0) -> Chain:
    uid, key = str(uuid.uuid4()), secrets.token_urlsafe(16)
    request = {"uid": uid, "num_conn": num_conn, "rate": rate,
               "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
    with ThreadPoolExecutor(2) as pool:
        prod_f = pool.submit(producer.call, "reserve", {**request, "role": "PROD"})
        cons_f = pool.submit(consumer.call, "reserve", {**request, "role": "CONS"})
        errors = []
        replies = []
        for future in (prod_f, cons_f):
            try:
                replies.append(future.result())
            except Exception as exc:  # noqa: BLE001 - release what succeeded, then raise
                errors.append(exc)
                replies.append(None)
    if errors:
        for gw in (producer, consumer):
            gw.call("release", {"uid": uid})
        raise errors[0]
    return Chain(producer, consumer, uid, key, replies[0], replies[1])


def connect_pair(chain: Chain, app_listeners: list[str], tls: bool = True,
                 prod_peer: tuple[str, str] | None = None,
                 cons_peer: tuple[str, str] | None = None) -> None:
    """hello, then connect ‖ connect. ``*_peer`` = (certificate, fingerprint) to give
    that side instead of the real peer's (an impostor)."""
    chain.producer.call("hello", {"uid": chain.uid, "key": chain.key, "role": "PROD",
                                  "app_listeners": app_listeners})
    prod_peer = prod_peer or (chain.cons["certificate"], chain.cons["cert_fingerprint"])
    cons_peer = cons_peer or (chain.prod["certificate"], chain.prod["cert_fingerprint"])

    def request(remote: list[str], peer: tuple[str, str]) -> dict:
        if not tls:
            return {"uid": chain.uid, "remote_listeners": remote, "tls": False}
        return {"uid": chain.uid, "remote_listeners": remote,
                "peer_certificate": peer[0], "peer_fingerprint": peer[1]}

    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(chain.producer.call, "connect",
                        request(chain.cons["listeners"], prod_peer)),
            pool.submit(chain.consumer.call, "connect",
                        request(chain.prod["listeners"], cons_peer)),
        ]
        for future in futures:
            future.result()


def impostor(tmp_path: Path) -> tuple[str, str]:
    """A certificate (and fingerprint) nobody in the chain holds the key of... except
    the test, which is what an impostor is."""
    directory = tmp_path / f"impostor-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    return generate_certificate("impostor", directory / "key.pem", directory / "cert.pem",
                                datetime.timedelta(days=1))


def digests(results: list[dict]) -> list[tuple[int, str]]:
    return sorted((r.get("bytes", -1), r.get("sha256", r.get("error", ""))) for r in results)


def assert_nothing_left(chain: Chain, root: Path) -> None:
    """No process, port, config, key or stream directory of the chain is left."""
    for gw, reply in ((chain.producer, chain.prod), (chain.consumer, chain.cons)):
        streams = gw.settings.state_dir / "streams"
        assert list(streams.iterdir()) == [], list(streams.iterdir())
        for address in reply["listeners"]:
            assert port_is_free(address), address
        assert gw.call("gateway_info", {})["active_streams"] == 0
    assert proxy_pids(under=root) == []


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
    chain = reserve_pair(producer, consumer, 3)
    try:
        connect_pair(chain, [apps[0].listeners[0], apps[1].listeners[0]], tls=tls)
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
