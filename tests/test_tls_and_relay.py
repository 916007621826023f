"""The gateway-to-gateway hop: pinning refuses impostors on either side, and the relay
keeps its promises (both directions, truncation reported, rate limit)."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import pytest

from scistream_prefect import open_stream, release_stream
from scistream_proxy.addresses import parse_address
from scistream_proxy.tls import generate_certificate

from conftest import run_consumer
from relaykit import echo_roundtrip


def _reserve(gw, role, uid, key="secret-key"):
    return gw.call("reserve", {"uid": uid, "role": role, "num_conn": 1,
                               "key_sha256": hashlib.sha256(key.encode()).hexdigest()})


def _impostor_material(tmp_path: Path) -> tuple[Path, Path, str, str]:
    key, cert = tmp_path / "impostor.key", tmp_path / "impostor.pem"
    pem, fingerprint = generate_certificate("impostor", key, cert, datetime.timedelta(days=1))
    return key, cert, pem, fingerprint


def test_consumer_proxy_refuses_a_server_that_is_not_the_pinned_peer(gateways, tmp_path):
    _, consumer = gateways
    uid = str(uuid.uuid4())
    cons = _reserve(consumer, "CONS", uid)
    # The peer the consumer gateway was told about (it pins this certificate) ...
    (tmp_path / "real").mkdir()
    _, _, real_pem, real_fp = _impostor_material(tmp_path / "real")
    # ... and an impostor listening where the stream points, with its own certificate.
    key, cert, _, _ = _impostor_material(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    impostor = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def serve() -> None:
        conn, _ = impostor.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.recv(100).decode(errors="replace"))
        except (ssl.SSLError, OSError) as exc:
            seen.append(f"handshake failed: {type(exc).__name__}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        consumer.call("connect", {
            "uid": uid, "remote_listeners": [f"127.0.0.1:{impostor.getsockname()[1]}"],
            "peer_fingerprint": real_fp, "peer_certificate": real_pem,
        })
        code, received = run_consumer(cons["listeners"])
        thread.join(timeout=30)
        status = consumer.call("status", {"uid": uid})
    finally:
        consumer.call("release", {"uid": uid})
        impostor.close()
    assert code != 0 and "error" in received[0]  # the consumer app is reset, not fed
    assert seen and seen[0].startswith("handshake failed"), seen
    assert status["connections"]["failed"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("present_cert", [True, False], ids=["own-cert", "no-cert"])
def test_producer_proxy_refuses_a_client_that_is_not_the_pinned_peer(
        gateways, producer_app, tmp_path, present_cert):
    producer, consumer = gateways
    uid, key = str(uuid.uuid4()), "secret-key"
    prod = _reserve(producer, "PROD", uid, key)
    cons = _reserve(consumer, "CONS", uid, key)
    app = producer_app(1, 1024)
    producer.call("hello", {"uid": uid, "key": key, "role": "PROD",
                            "app_listeners": app.listeners})
    producer.call("connect", {"uid": uid, "remote_listeners": cons["listeners"],
                              "peer_fingerprint": cons["cert_fingerprint"],
                              "peer_certificate": cons["certificate"]})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if present_cert:
        ikey, icert, _, _ = _impostor_material(tmp_path)
        ctx.load_cert_chain(icert, ikey)
    try:
        with socket.create_connection(parse_address(prod["listeners"][0]), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with ctx.wrap_socket(raw) as tls:
                    # TLS 1.3: the server's verdict on our certificate arrives with the
                    # first read after the client finished its side of the handshake.
                    assert tls.recv(1) == b""
        # The relay counts the refusal after cutting the socket: the client may see the
        # cut first.
        deadline = time.monotonic() + 10
        while True:
            status = producer.call("status", {"uid": uid})
            if status["connections"]["handshakes_refused"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        producer.call("release", {"uid": uid})
        consumer.call("release", {"uid": uid})
    # Refused on the WAN side: not a connection of the stream, nor a failed one (anyone
    # may start a handshake; docs/native.md, "Under a flood").
    assert status["connections"]["handshakes_refused"] == 1
    assert status["connections"]["failed"] == 0
    assert status["bytes"] == {"from_app": 0, "to_app": 0}
    # The producer app never got a connection: it is still waiting in accept().
    assert app.proc.poll() is None


def test_traffic_flows_both_ways_through_the_tls_hop(gateways):
    """An echo server behind the producer gateway: every byte the consumer side sends
    comes back, over one TLS connection used in both directions at once."""
    producer, consumer = gateways
    echo = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    handle = open_stream(producer, consumer, num_conn=1,
                         app_listeners=[f"127.0.0.1:{echo.getsockname()[1]}"])
    payload = os.urandom(8 << 20)
    try:
        back = echo_roundtrip(handle.listeners[0], payload)
    finally:
        release_stream(producer, consumer, handle.uid)
        echo.close()
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


@pytest.mark.slow
def test_a_killed_producer_proxy_is_a_reset_not_a_clean_end(gateways, producer_app):
    """Truncation must never look like the end of the data to the consumer app."""
    producer, consumer = gateways
    app = producer_app(1, 1 << 34)  # far more than will ever be read
    handle = open_stream(producer, consumer, num_conn=1, app_listeners=app.listeners)
    try:
        pid = producer.call("status", {"uid": handle.uid})["pid"]
        with socket.create_connection(parse_address(handle.listeners[0]), timeout=30) as sock:
            assert len(sock.recv(65536)) > 0
            os.kill(pid, 9)
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass
        assert producer.call("status", {"uid": handle.uid})["alive"] is False
    finally:
        release_stream(producer, consumer, handle.uid)


@pytest.mark.slow
def test_rate_limit_is_enforced(gateways, producer_app):
    producer, consumer = gateways
    total = 4 << 20
    app = producer_app(1, total)
    rate_kbps = 16_000  # 2 MB/s
    handle = open_stream(producer, consumer, num_conn=1, rate=rate_kbps,
                         app_listeners=app.listeners)
    try:
        started = time.monotonic()
        code, received = run_consumer(handle.listeners)
        elapsed = time.monotonic() - started
    finally:
        release_stream(producer, consumer, handle.uid)
    assert code == 0 and received[0]["bytes"] == total
    # Limits are lower bounds on time whatever the machine's load: 4 MiB at 2 MB/s
    # takes 2.1 s, less the 0.2 s burst each proxy may start with.
    assert elapsed >= 1.5, elapsed


@pytest.mark.slow
def test_a_consumer_that_hangs_up_stops_the_producer_promptly(gateways, producer_app):
    """A half-close from the consumer is only that: the producer's data keeps flowing
    to it, as over a direct TCP connection. When the consumer then hangs up with data in
    flight, that travels back at once (well before the drain timeout) as a reset, and the
    producer app sees it as one."""
    from scistream_proxy.engines import DRAIN_TIMEOUT_S

    producer, consumer = gateways
    app = producer_app(1, 1 << 34)
    handle = open_stream(producer, consumer, num_conn=1, app_listeners=app.listeners)
    try:
        with socket.create_connection(parse_address(handle.listeners[0]), timeout=30) as sock:
            assert len(sock.recv(65536)) > 0
            sock.shutdown(socket.SHUT_WR)  # nothing more to send; still reading
            after_half_close = 0
            while after_half_close < 64 << 20:  # the producer's data still flows
                chunk = sock.recv(1 << 20)
                assert chunk, f"the stream ended {after_half_close} bytes after a half-close"
                after_half_close += len(chunk)
            # Closing with unread data is a reset (the kernel's).
        hung_up = time.monotonic()
        sent = app.result(timeout=DRAIN_TIMEOUT_S * 3)
        stopped_after = time.monotonic() - hung_up
    finally:
        release_stream(producer, consumer, handle.uid)
    assert "error" in sent[0]  # the producer app saw its receiver go, not a clean finish
    assert sent[0]["error"].startswith(("ConnectionResetError", "BrokenPipeError")), sent
    assert stopped_after < DRAIN_TIMEOUT_S - 2, stopped_after


def _serve_once(context: ssl.SSLContext) -> tuple[socket.socket, threading.Thread]:
    """A TLS server for one connection: handshake, send b"ok", close."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _tickets_seen_by_openssl(tmp_path: Path, context: ssl.SSLContext, client_key: Path,
                             client_cert: Path) -> int:
    """NewSessionTicket messages OpenSSL's own client receives from ``context``."""
    import subprocess

    listener, thread = _serve_once(context)
    try:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}",
             "-tls1_3", "-cert", str(client_cert), "-key", str(client_key), "-msg",
             "-ign_eof", "-sess_out", str(tmp_path / "session.pem")],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30).stdout
    finally:
        thread.join(timeout=10)
        listener.close()
    assert "ok" in out  # the handshake completed and the server's data arrived
    return sum(1 for line in out.splitlines()
               if line.startswith("<<<") and "NewSessionTicket" in line)


def test_no_tls_context_sends_session_tickets(tmp_path):
    """TLS 1.3 servers send tickets after the handshake; OP_NO_TICKET alone still sends
    two. Counted by OpenSSL's client, and by Python's against the pinned pair."""
    from scistream_proxy.tls import pinned_context

    (tmp_path / "s").mkdir()
    (tmp_path / "c").mkdir()
    skey, scert, _, _ = _impostor_material(tmp_path / "s")
    ckey, ccert, _, _ = _impostor_material(tmp_path / "c")
    server = pinned_context(server=True, cert_path=scert, key_path=skey, peer_cert_path=ccert)
    client = pinned_context(server=False, cert_path=ccert, key_path=ckey, peer_cert_path=scert)

    # The counter sees tickets where there are some: OP_NO_TICKET without num_tickets = 0.
    only_option = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    only_option.load_cert_chain(scert, skey)
    only_option.options |= ssl.OP_NO_TICKET
    assert _tickets_seen_by_openssl(tmp_path, only_option, ckey, ccert) == 2

    assert _tickets_seen_by_openssl(tmp_path, server, ckey, ccert) == 0

    # The pinned client against the pinned server: nothing to resume with.
    listener, thread = _serve_once(server)
    try:
        with socket.create_connection(listener.getsockname()[:2], timeout=10) as raw:
            with client.wrap_socket(raw) as tls:
                assert tls.recv(2) == b"ok"  # tickets would have come before the data
                assert not tls.session.has_ticket
    finally:
        thread.join(timeout=10)
        listener.close()
