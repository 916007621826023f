"""Load: many concurrent TLS streams on one gateway pair, each carrying checked data.

``SCISTREAM_LOAD_STREAMS`` streams (default 200) of ``SCISTREAM_LOAD_NUM_CONN``
connections (default 2) are set up concurrently on two local gateways (native backend,
TLS between them; ports 13000-13499 and 13500-13999), every connection carries
``SCISTREAM_LOAD_BYTES`` (default 1MiB) of data unique to its stream and connection,
all at once, and every byte is compared on arrival. Then all are released. Asserted:
0 corrupt or missing bytes, every listener port distinct, every stream released, no
relay process, port, key directory or active stream left. Printed: the timings of
setup, transfer and release, and the peak memory of both relays and of the test::

    unshare --net sh -c 'ip link set lo up && .venv/bin/python -m pytest -s tests/test_load.py'
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import secrets
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scistream_prefect import LocalGateway
from scistream_prefect.cli import parse_size
from scistream_proxy.leaks import port_is_free, proxy_pids
from scistream_proxy.addresses import parse_address

import pytest

pytestmark = pytest.mark.slow

STREAMS = int(os.environ.get("SCISTREAM_LOAD_STREAMS", "200"))
NUM_CONN = int(os.environ.get("SCISTREAM_LOAD_NUM_CONN", "2"))
BYTES = parse_size(os.environ.get("SCISTREAM_LOAD_BYTES", "1MiB"))
PROD_PORTS, CONS_PORTS = (13000, 13499), (13500, 13999)
BLOCK = 1 << 16
SETUP_THREADS = 16


def block(stream: int, conn: int, index: int) -> bytes:
    """Block ``index`` of the data of connection ``conn`` of stream ``stream``: no two
    connections, streams or blocks carry the same bytes, so crossed wires show."""
    return hashlib.shake_128(f"{stream}/{conn}/{index}".encode()).digest(BLOCK)


def expected_bytes(stream: int, conn: int):
    """The bytes a connection must deliver, block by block (the last one cut short)."""
    sent = 0
    index = 0
    while sent < BYTES:
        data = block(stream, conn, index)[: BYTES - sent]
        yield data
        sent += len(data)
        index += 1


async def produce(listener: socket.socket, stream: int, conn: int) -> None:
    loop = asyncio.get_running_loop()
    sock, _ = await loop.sock_accept(listener)
    listener.close()
    with sock:
        for data in expected_bytes(stream, conn):
            await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
        while await loop.sock_recv(sock, 4096):  # until the relay closes its side
            pass


def differing(got: bytes, want: bytes) -> int:
    """Bytes that differ, counting a missing or extra tail as differing."""
    common = min(len(got), len(want))
    return (sum(a != b for a, b in zip(got[:common], want[:common], strict=True))
            + abs(len(got) - len(want)))


async def consume(address: str, stream: int, conn: int) -> dict:
    """Read one connection to its end; count bytes that differ from what was sent,
    and bytes missing or extra."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, parse_address(address))
    expected = expected_bytes(stream, conn)
    pending = bytearray()
    received = corrupt = 0
    with sock:
        while data := await loop.sock_recv(sock, 1 << 18):
            received += len(data)
            pending += data
            while len(pending) >= BLOCK:
                want = next(expected, b"")
                got = bytes(pending[: len(want) or BLOCK])
                del pending[: len(got)]
                if got != want:
                    corrupt += differing(got, want)
                if not want:
                    break
    if pending:
        want = next(expected, b"")
        corrupt += differing(pending, want)
    missing = sum(len(rest) for rest in expected)
    return {"received": received, "corrupt": corrupt, "missing": missing}


async def transfer(app_sockets: list[list[socket.socket]], consumer_listeners: list[list[str]]
                   ) -> list[dict]:
    producers = [asyncio.create_task(produce(sock, i, j))
                 for i, socks in enumerate(app_sockets) for j, sock in enumerate(socks)]
    results = await asyncio.gather(*(consume(address, i, j)
                                     for i, listeners in enumerate(consumer_listeners)
                                     for j, address in enumerate(listeners)))
    await asyncio.wait_for(asyncio.gather(*producers), timeout=120)
    return list(results)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def open_stream(producer: LocalGateway, consumer: LocalGateway, uid: str,
                app_listeners: list[str]) -> dict:
    """reserve ‖ reserve, connect ‖ connect with the producer's hello carried by its
    connect: the gateway calls of setup_stream, without a Prefect task run around each."""
    key = secrets.token_urlsafe(32)
    key_sha256 = hashlib.sha256(key.encode()).hexdigest()
    with ThreadPoolExecutor(2) as pool:
        prod_f, cons_f = (pool.submit(gw.call, "reserve", {
            "uid": uid, "role": role, "num_conn": NUM_CONN, "key_sha256": key_sha256})
            for gw, role in ((producer, "PROD"), (consumer, "CONS")))
        prod, cons = prod_f.result(), cons_f.result()
        hello = {"hello": {"key": key, "app_listeners": app_listeners}}
        connects = [pool.submit(gw.call, "connect", {
            "uid": uid, "remote_listeners": peer["listeners"],
            "peer_fingerprint": peer["cert_fingerprint"],
            "peer_certificate": peer["certificate"], **extra})
            for gw, peer, extra in ((producer, cons, hello), (consumer, prod, {}))]
        for future in connects:
            assert future.result()["state"] == "CONNECTED"
    return {"uid": uid, "producer": prod["listeners"], "consumer": cons["listeners"]}


def test_concurrent_tls_streams_carry_every_byte_and_leave_nothing(gateway_root):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = STREAMS * NUM_CONN * 4 + 1000  # sockets of the apps, the relays inherit it
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    producer, consumer = (
        LocalGateway.create(name, gateway_root / name, port_range=ports).model_copy(
            update={"workers": SETUP_THREADS // 2})
        for name, ports in (("load-prod", PROD_PORTS), ("load-cons", CONS_PORTS)))
    app_sockets = []
    for _ in range(STREAMS):
        socks = []
        for _ in range(NUM_CONN):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
            sock.setblocking(False)
            socks.append(sock)
        app_sockets.append(socks)
    app_listeners = [[f"127.0.0.1:{s.getsockname()[1]}" for s in socks] for socks in app_sockets]
    for gw in (producer, consumer):
        gw.warm_up()

    uids = [str(uuid.uuid4()) for _ in range(STREAMS)]
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(SETUP_THREADS) as pool:
            streams = list(pool.map(lambda args: open_stream(producer, consumer, *args),
                                    zip(uids, app_listeners, strict=True)))
        setup_s = time.perf_counter() - started
        for end, (low, high) in (("producer", PROD_PORTS), ("consumer", CONS_PORTS)):
            ports = [parse_address(a)[1] for s in streams for a in s[end]]
            assert len(ports) == STREAMS * NUM_CONN
            assert len(set(ports)) == len(ports), f"{end}: a port was handed out twice"
            assert all(low <= p <= high for p in ports)
        relays = {gw.settings.name: proxy_pids(under=gw.settings.state_dir)
                  for gw in (producer, consumer)}
        assert [len(pids) for pids in relays.values()] == [1, 1], relays  # one per gateway

        started = time.perf_counter()
        results = asyncio.run(transfer(app_sockets, [s["consumer"] for s in streams]))
        transfer_s = time.perf_counter() - started
        relay_peak_kib = {name: peak_rss_kib(pids[0]) for name, pids in relays.items()}
        statuses = [producer.call("status", {"uid": s["uid"]}) for s in streams[:5]]
    finally:
        try:
            started = time.perf_counter()
            with ThreadPoolExecutor(SETUP_THREADS) as pool:
                released = list(pool.map(lambda uid: [gw.call("release", {"uid": uid})
                                                      for gw in (producer, consumer)], uids))
            release_s = time.perf_counter() - started
        finally:  # the tests after this one get the descriptors back, whatever failed
            for socks in app_sockets:
                for sock in socks:
                    sock.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    moved = sum(r["received"] for r in results)
    corrupt = sum(r["corrupt"] for r in results)
    missing = sum(r["missing"] for r in results)
    report = {
        "streams": STREAMS, "num_conn": NUM_CONN, "bytes_per_connection": BYTES,
        "setup_s": round(setup_s, 2), "transfer_s": round(transfer_s, 2),
        "release_s": round(release_s, 2), "moved_bytes": moved,
        "throughput_gbit_s": round(moved * 8 / transfer_s / 1e9, 2),
        "corrupt_bytes": corrupt, "missing_bytes": missing,
        "relay_peak_rss_mib": {k: round(v / 1024, 1) for k, v in relay_peak_kib.items()},
        "test_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print("\nload:", json.dumps(report))
    if os.environ.get("SCISTREAM_LOAD_REPORT"):
        Path(os.environ["SCISTREAM_LOAD_REPORT"]).write_text(json.dumps(report, indent=2))

    assert corrupt == 0 and missing == 0, report
    assert moved == STREAMS * NUM_CONN * BYTES
    assert all(s["state"] == "CONNECTED" and s["alive"] for s in statuses)
    assert all(r["released"] for pair in released for r in pair)
    for gw, (low, high) in ((producer, PROD_PORTS), (consumer, CONS_PORTS)):
        info = gw.call("gateway_info", {})
        assert info["active_streams"] == 0 and info["free_ports"] == high - low + 1, info
        assert proxy_pids(under=gw.settings.state_dir) == []
        assert list((gw.settings.state_dir / "streams").iterdir()) == []
        assert all(port_is_free(f"{gw.settings.wan_address}:{p}") for p in range(low, high + 1))
    for s in streams[:20]:
        assert producer.call("status", {"uid": s["uid"]})["state"] == "RELEASED"
