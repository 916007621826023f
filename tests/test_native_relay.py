"""The native relay: its data paths keep every byte (sealed frames and plain hops in
pumps, rate limits, partial reads and writes, half-close, many connections), and one relay per
gateway hosts many streams, dies visibly, exits with its last stream, drops an
abandoned one."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import pytest

from scistream_proxy.addresses import parse_address
from scistream_proxy.backends import ProxySpec
from scistream_proxy.leaks import port_is_free, proxy_pids
from scistream_proxy.ktls import ktls_available
from scistream_proxy.native_backend import NativeBackend
from scistream_proxy.process import ProcessIdentity
from scistream_proxy.relay_files import CONTROL_SOCKET, relay_dir_of

from conftest import make_gateway
from relaykit import KEY, Server, echo, echo_roundtrip, release_both, reserve_end

# How a stream's connections move bytes: TLS with sealed frames between the two native
# relays (where the kernel has no TLS; else TLS records with kernel TLS), or plain TCP
# both sides (copied or spliced by how busy the pump is). A throttled connection runs a
# thread per direction instead of a pump.
MODES = [pytest.param("tls", id="tls"), pytest.param("plain", id="plain")]
COUNTED = ("spliced", "frames", "pumped")
FRAMES = ktls_available() is not None  # two native relays agree on frames
GATEWAY_SETTINGS = {"allow_plain_tcp": True}  # the ``gateways`` fixture's: plain mode


@pytest.fixture(params=MODES)
def mode(request) -> str:
    """Whether the stream this test opens is TLS (``tls``) or plain TCP (``plain``)."""
    return request.param


def _counted(mode: str, n: int, throttled: bool = False) -> dict:
    """What status counts for ``n`` connections of a stream in ``mode``."""
    frames = n if mode == "tls" and FRAMES else 0
    pumped = 0 if throttled or (mode == "tls" and not FRAMES) else n
    # Plain in a pump: copied or spliced by how busy the pump was as each came.
    spliced = None if mode == "plain" and not throttled else 0
    return {"spliced": spliced, "frames": frames, "pumped": pumped}


def _counts(status: dict, mode: str, n: int, throttled: bool = False) -> tuple[dict, dict]:
    """(what status counted, what ``mode`` makes it count) for ``n`` connections."""
    expected = _counted(mode, n, throttled)
    counted = {k: status["connections"][k] for k in COUNTED if expected[k] is not None}
    counted["aead"] = status["connections"]["frames_aead"]
    expected["aead"] = "cryptography" if mode == "tls" and FRAMES else None
    return counted, {k: v for k, v in expected.items() if v is not None or k == "aead"}


def _open(producer, consumer, app_listeners, *, tls=True, rate=0) -> tuple[str, list[str]]:
    """Both ends of a stream through the gateway calls; returns (uid, consumer listeners)."""
    uid, num_conn = str(uuid.uuid4()), len(app_listeners)
    prod = reserve_end(producer, "PROD", uid, num_conn, rate)
    cons = reserve_end(consumer, "CONS", uid, num_conn, rate)
    producer.call("hello", {"uid": uid, "key": KEY, "role": "PROD",
                            "app_listeners": app_listeners})

    def peer(reply):
        if not tls:
            return {"tls": False}
        return {"peer_fingerprint": reply["cert_fingerprint"],
                "peer_certificate": reply["certificate"]}

    producer.call("connect", {"uid": uid, "remote_listeners": cons["listeners"], **peer(cons)})
    consumer.call("connect", {"uid": uid, "remote_listeners": prod["listeners"], **peer(prod)})
    return uid, cons["listeners"]


def _relay_pid(gw) -> int:
    pids = proxy_pids(under=Path(gw.settings_path).parent)
    assert len(pids) == 1, pids
    return pids[0]


def test_many_connections_on_one_stream_keep_every_byte(gateways, mode):
    """64 connections at once through one listener, each echoed end to end."""
    producer, consumer = gateways
    tls = mode == "tls"
    server = Server(echo)
    uid, listeners = _open(producer, consumer, [server.address], tls=tls)
    payloads = [os.urandom(256 << 10) for _ in range(64)]
    results: list[bytes | None] = [None] * len(payloads)

    def one(i):
        results[i] = echo_roundtrip(listeners[0], payloads[i])

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        statuses = [gw.call("status", {"uid": uid}) for gw in (producer, consumer)]
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert all(r is not None and hashlib.sha256(r).digest() == hashlib.sha256(p).digest()
               for r, p in zip(results, payloads, strict=True))
    for status in statuses:
        assert status["connections"]["total"] == 64
        assert status["connections"]["failed"] == 0
        # Each connection went the mode's way (frames: both ends agreed on them).
        counted, expected = _counts(status, mode, 64)
        assert counted == expected
        assert 0 <= status["connections"]["spliced"] <= 64


def _slow_sink(received: dict):
    """Reads in small pieces through a small receive buffer: the relay meets partial
    writes (send/splice taking part of what it has) again and again."""

    def handler(conn):
        digest, total = hashlib.sha256(), 0
        while chunk := conn.recv(4093):
            digest.update(chunk)
            total += len(chunk)
            if total % (256 << 10) < 4093:
                time.sleep(0.01)
        received[total] = digest.hexdigest()

    return handler


@pytest.mark.slow
def test_half_close_from_the_consumer_delivers_everything_with_partial_writes(gateways, mode):
    producer, consumer = gateways
    tls = mode == "tls"
    received: dict = {}
    server = Server(_slow_sink(received))
    uid, listeners = _open(producer, consumer, [server.address], tls=tls)
    payload = os.urandom((4 << 20) + 12345)
    try:
        with socket.create_connection(parse_address(listeners[0]), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            for start in range(0, len(payload), 100_000):  # uneven writes
                sock.sendall(payload[start:start + 100_000])
            sock.shutdown(socket.SHUT_WR)
            # The end travels on: the relay closes its side once the server closed.
            assert sock.recv(1) == b""
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert not server.errors
    assert received == {len(payload): hashlib.sha256(payload).hexdigest()}


@pytest.mark.slow
def test_half_close_from_the_producer_is_a_clean_end_after_every_byte(gateways, mode):
    producer, consumer = gateways
    tls = mode == "tls"
    payload = os.urandom((3 << 20) + 777)

    def send_and_end(conn):
        for start in range(0, len(payload), 65_521):
            conn.sendall(payload[start:start + 65_521])
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):  # until the consumer side closes
            pass

    server = Server(send_and_end)
    uid, listeners = _open(producer, consumer, [server.address], tls=tls)
    got = bytearray()
    try:
        with socket.create_connection(parse_address(listeners[0]), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            while chunk := sock.recv(5000):  # small reads; ends with b"", not a reset
                got += chunk
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


@pytest.mark.slow
def test_rate_limited_stream_keeps_every_byte(gateways, mode):
    producer, consumer = gateways
    tls = mode == "tls"
    server = Server(echo)
    uid, listeners = _open(producer, consumer, [server.address], tls=tls, rate=40_000)
    payload = os.urandom(1 << 20)
    try:
        back = echo_roundtrip(listeners[0], payload)
        status = consumer.call("status", {"uid": uid})
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    counted, expected = _counts(status, mode, 1, throttled=True)
    assert counted == expected


def test_tls_hop_negotiates_aes_128_gcm_and_a_peer_without_frames_gets_tls_records(gateways):
    """The relay's own OpenSSL configuration puts AES-128-GCM first; the PROD end
    (the TLS server) chooses by its order even when the client prefers AES-256. A TLS
    client that does not offer sealed frames (ALPN), as a C proxy at the other gateway,
    is served TLS records."""
    producer, consumer = gateways
    server = Server(echo)
    uid, _ = _open(producer, consumer, [server.address])
    prod = producer.call("status", {"uid": uid})
    cons_dir = Path(consumer.settings_path).parent / "streams" / uid
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cons_dir / "cert.pem", cons_dir / "key.pem")
    try:
        assert ctx.get_ciphers()[0]["name"] == "TLS_AES_256_GCM_SHA384"  # the default order
        with socket.create_connection(parse_address(prod["listeners"][0]), timeout=30) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"ping")
                assert tls.recv(4) == b"ping"
                cipher, alpn = tls.cipher(), tls.selected_alpn_protocol()
        status = producer.call("status", {"uid": uid})["connections"]
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert cipher[0] == "TLS_AES_128_GCM_SHA256" and cipher[1] == "TLSv1.3"
    assert alpn is None
    assert status["frames"] == 0 and status["total"] == 1


@pytest.mark.slow
@pytest.mark.skipif(ktls_available() is not None, reason=str(ktls_available()))
def test_kernel_tls_is_engaged_where_the_kernel_offers_it(gateways):
    producer, consumer = gateways
    server = Server(echo)
    uid, listeners = _open(producer, consumer, [server.address])
    payload = os.urandom(4 << 20)
    try:
        back = echo_roundtrip(listeners[0], payload)
        statuses = [gw.call("status", {"uid": uid}) for gw in (producer, consumer)]
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert back == payload
    # OpenSSL hands at least the sending direction to the kernel where it can.
    assert all(s["connections"]["ktls"]["tx"] == 1 for s in statuses), statuses


def test_one_relay_per_gateway_hosts_many_streams_and_exits_with_the_last(gateway_root):
    producer = make_gateway(gateway_root, "prod-gw", **GATEWAY_SETTINGS)
    consumer = make_gateway(gateway_root, "cons-gw", **GATEWAY_SETTINGS)
    server = Server(echo)
    streams = [_open(producer, consumer, [server.address], tls=i % 2 == 0) for i in range(6)]
    try:
        prod_pid, cons_pid = _relay_pid(producer), _relay_pid(consumer)
        assert prod_pid != cons_pid  # each gateway its own relay
        assert {producer.call("status", {"uid": u})["pid"] for u, _ in streams} == {prod_pid}
        for _, listeners in streams:
            assert echo_roundtrip(listeners[0], b"x" * 100_000) == b"x" * 100_000
        # Releasing all but the last keeps the relay; the last release ends it.
        for uid, _ in streams[:-1]:
            release_both(producer, consumer, uid)
        assert _relay_pid(producer) == prod_pid
        last_uid, last_listeners = streams[-1]
        assert echo_roundtrip(last_listeners[0], b"y" * 1000) == b"y" * 1000
    finally:
        for uid, _ in streams:
            release_both(producer, consumer, uid)
        server.close()
    assert proxy_pids(under=gateway_root) == []
    relay_dir = Path(producer.settings_path).parent / "relay"
    assert not (relay_dir / CONTROL_SOCKET).exists()
    assert all(port_is_free(a) for _, ls in streams for a in ls)


@pytest.mark.slow
def test_a_killed_relay_shows_in_every_stream_and_the_next_reserve_starts_another(gateways):
    producer, consumer = gateways
    server = Server(echo)
    streams = [_open(producer, consumer, [server.address]) for _ in range(3)]
    try:
        pid = _relay_pid(producer)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while ProcessIdentity.of(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        statuses = [producer.call("status", {"uid": u}) for u, _ in streams]
        assert all(s["alive"] is False and s["state"] == "FAILED" for s in statuses)
        assert all(consumer.call("status", {"uid": u})["alive"] for u, _ in streams)
        for uid, _ in streams:
            release_both(producer, consumer, uid)
        # A new reserve replaces the dead relay (its stale control socket included).
        uid, listeners = _open(producer, consumer, [server.address])
        streams.append((uid, listeners))
        assert _relay_pid(producer) != pid
        assert echo_roundtrip(listeners[0], b"z" * 50_000) == b"z" * 50_000
    finally:
        for uid, _ in streams:
            release_both(producer, consumer, uid)
        server.close()


def _start_and_die(stream_dir: str, port: int) -> None:
    """A worker's reserve that dies right after the relay took the stream."""
    sock = socket.create_server(("127.0.0.1", port))
    directory = Path(stream_dir)
    NativeBackend().start(ProxySpec(uid=directory.name, role="CONS", stream_dir=directory,
                                    sockets=[sock]))
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-another-stream"])
def test_abandon_drops_a_stream_whose_handle_was_never_recorded(gateways, others):
    producer, consumer = gateways
    server = Server(echo)
    kept = [_open(producer, consumer, [server.address]) for _ in range(others)]
    state_dir = Path(consumer.settings_path).parent
    uid = str(uuid.uuid4())
    stream_dir = state_dir / "streams" / uid
    stream_dir.mkdir(mode=0o700, parents=True)
    port = 31000 + others
    worker = multiprocessing.get_context("fork").Process(
        target=_start_and_die, args=(str(stream_dir), port))
    worker.start()
    worker.join(timeout=60)
    try:
        assert worker.exitcode == -signal.SIGKILL
        assert not port_is_free(f"127.0.0.1:{port}")  # the relay holds the stream's port
        NativeBackend().abandon(stream_dir, uid)
        assert port_is_free(f"127.0.0.1:{port}")
        NativeBackend().abandon(stream_dir, uid)  # idempotent
        if others:  # the other stream still runs in the same relay
            assert consumer.call("status", {"uid": kept[0][0]})["alive"]
            assert echo_roundtrip(kept[0][1][0], b"k" * 1000) == b"k" * 1000
        else:  # it was the relay's only stream: the relay is gone
            assert proxy_pids(under=state_dir) == []
            assert not relay_dir_of(stream_dir).joinpath(CONTROL_SOCKET).exists()
    finally:
        for uid_, _ in kept:
            release_both(producer, consumer, uid_)
        server.close()
        shutil.rmtree(stream_dir)


@pytest.mark.slow
def test_a_retried_reserve_replaces_the_stream_a_dead_worker_left_in_the_relay(gateways):
    _, consumer = gateways
    state_dir = Path(consumer.settings_path).parent
    uid = str(uuid.uuid4())
    stream_dir = state_dir / "streams" / uid
    stream_dir.mkdir(mode=0o700, parents=True)
    worker = multiprocessing.get_context("fork").Process(
        target=_start_and_die, args=(str(stream_dir), 31010))
    worker.start()
    worker.join(timeout=60)
    backend = NativeBackend()
    try:
        assert worker.exitcode == -signal.SIGKILL
        assert not port_is_free("127.0.0.1:31010")
        again = socket.create_server(("127.0.0.1", 31011))
        handle = backend.start(ProxySpec(uid=uid, role="CONS", stream_dir=stream_dir,
                                         sockets=[again]))
        again.close()
        assert port_is_free("127.0.0.1:31010")  # the abandoned one's port
        assert not port_is_free("127.0.0.1:31011")
        assert backend.status(handle, stream_dir)["alive"]
        backend.stop(handle, stream_dir)
        assert port_is_free("127.0.0.1:31011")
        assert proxy_pids(under=state_dir) == []
    finally:
        backend.abandon(stream_dir, uid)
        shutil.rmtree(stream_dir)
