"""HAProxy and nginx on a WAN listener under abuse: silent clients (who never finish a
TLS handshake) are cut after the gateway's ``handshake_timeout_s`` and hold at most the
stream end's connection cap meanwhile; a data connection idle for longer than that
timeout is not cut; once the clients are gone the stream serves its real peer. (The
native relay's flood test is test_flood.py; stunnel has neither bound: docs/backends.md.)"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from scistream_prefect import LocalPair
from scistream_proxy.addresses import parse_address
from scistream_proxy.limits import MIN_CONN_PER_STREAM

from backend_chain import skip_reason
from conftest import make_gateway
from relaykit import Server, echo, echo_roundtrip

# Short, so that the test waits little; not so short that a real peer's handshake
# misses it on a loaded 2-core machine.
HANDSHAKE_TIMEOUT_S = 3
# Far below the proxies' own defaults (nginx 60 s, HAProxy's 24 h client timeout).
CUT_WITHIN_S = 30


def _silent(address: str, count: int) -> list[socket.socket]:
    return [socket.create_connection(parse_address(address), timeout=CUT_WITHIN_S)
            for _ in range(count)]


def _closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Whether the proxy ended this never-authenticated connection (EOF or reset)
    before ``deadline`` (monotonic)."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("backend", ["haproxy", "nginx"])
def test_silent_clients_are_cut_at_the_handshake_timeout_and_capped(gateway_root: Path,
                                                                    backend: str):
    if reason := skip_reason(backend):
        pytest.skip(reason)
    settings = {"backend": backend, "handshake_timeout_s": HANDSHAKE_TIMEOUT_S,
                "conn_per_listener": 1}
    server = Server(echo)
    with LocalPair(make_gateway(gateway_root, f"prod-{backend}", **settings),
                   make_gateway(gateway_root, f"cons-{backend}", **settings)) as pair:
        stream = pair.open([server.address])
        try:
            # A data connection that idles past the handshake timeout stays up.
            with socket.create_connection(parse_address(stream.listeners[0]),
                                          timeout=30) as data:
                data.sendall(b"ping")
                assert data.recv(4) == b"ping"

                wan = stream.prod["listeners"][0]
                # The cap (one listener, conn_per_listener 1: the least, 16) less the
                # data connection: these fill it.
                silent = _silent(wan, MIN_CONN_PER_STREAM - 1)
                started = time.monotonic()
                try:
                    beyond = _silent(wan, 1)[0]  # over the cap
                    deadline = started + CUT_WITHIN_S
                    cut = [_closed_by_peer(s, deadline) for s in silent]
                    assert all(cut), f"{cut.count(False)} silent clients still connected"
                    # Beyond the cap: nginx closes it at once, HAProxy leaves it in the
                    # kernel's backlog and then meets it as a silent client too.
                    assert _closed_by_peer(beyond, deadline + CUT_WITHIN_S)
                finally:
                    for sock in silent:
                        sock.close()
                    beyond.close()
                print(f"{backend}: silent clients cut after {time.monotonic() - started:.1f} s")

                time.sleep(1)  # the data connection has idled past the timeout
                data.sendall(b"still")
                assert data.recv(5) == b"still"
            # The stream serves its real peer (a new connection, a new handshake).
            payload = os.urandom(256 << 10)
            assert echo_roundtrip(stream.listeners[0], payload) == payload
        finally:
            stream.release()
            server.close()
        left = pair.leftovers().processes
    assert not left, f"proxy processes left running: {left}"
