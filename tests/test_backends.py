"""The subprocess backends (stunnel, HAProxy, nginx): interop with each other and with
the native proxy, TLS pinning, ports held from reserve, crash detection, rates, and
release leaving nothing behind. Real proxies on loopback, real gateway functions."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from backend_chain import (
    MIB,
    connect_early,
    holds_port,
    impostor,
    round_robin_transfer,
    skip_reason,
    status_line,
)
from conftest import make_gateway, run_consumer
from scistream_gateway.errors import NotImplementedHere, ServerError
from scistream_gateway.settings import GatewaySettings
from scistream_prefect import LocalPair
from scistream_proxy.process import ProcessIdentity

EXTERNAL = ("stunnel", "haproxy", "nginx")
FAST_PAIRING = ("native", "haproxy", True)  # the one external pairing of the fast tier


def needs(*names: str):
    reasons = [r for r in (skip_reason(n) for n in names if n != "native") if r]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def pairs():
    """native<->each (both ways) and each<->itself, TLS and plain; and the external
    backends with each other, once each way round."""
    crossed = [("stunnel", "haproxy"), ("haproxy", "nginx"), ("nginx", "stunnel")]
    for name in EXTERNAL:
        for prod, cons in (("native", name), (name, "native"), (name, name)):
            for tls in (True, False):
                if not tls and "stunnel" in (prod, cons):
                    continue  # stunnel only relays TLS: refused, tested below
                marks = [needs(prod, cons)]
                if (prod, cons, tls) != FAST_PAIRING:
                    marks.append(pytest.mark.slow)
                yield pytest.param(prod, cons, tls, id=f"{prod}-{cons}-{'tls' if tls else 'plain'}",
                                   marks=marks)
    for prod, cons in crossed:
        yield pytest.param(prod, cons, True, id=f"{prod}-{cons}-tls",
                           marks=[needs(prod, cons), pytest.mark.slow])


def chain_gateways(root: Path, prod: str, cons: str):
    # Plain TCP allowed: the chains are tested with and without TLS.
    return (make_gateway(root, f"prod-{prod}", backend=prod, allow_plain_tcp=True),
            make_gateway(root, f"cons-{cons}", backend=cons, allow_plain_tcp=True))


@pytest.mark.parametrize("prod, cons, tls", list(pairs()))
def test_checksummed_transfer_through_every_pairing(gateway_root, producer_app, prod, cons, tls):
    producer, consumer = chain_gateways(gateway_root, prod, cons)
    chain, statuses, _ = round_robin_transfer(producer, consumer, producer_app, tls)
    for status in statuses:
        if status["bytes"] is None:  # the backend must say that it does not count
            assert "no byte counters" in status["proxy_detail"], status_line(status)
    assert not chain.pair.leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTERNAL)
def test_ports_are_held_from_reserve_and_early_connections_kept(gateway_root, producer_app,
                                                                name):
    """The listening sockets bound at reserve are the proxy's: a peer that connects
    before connect waits in the backlog and is served once the proxy runs."""
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer, consumer = chain_gateways(gateway_root, "native", name)
    app = producer_app(1, 4 * MIB)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        assert holds_port(chain.cons["listeners"][0])
        status = consumer.call("status", {"uid": chain.uid})
        assert status["alive"] is True and status["state"] == "RESERVED"
        early = connect_early(chain.cons["listeners"][0])  # before connect
        chain.connect(app.listeners)
        received = bytearray()
        with early:
            while chunk := early.recv(1 << 20):
                received += chunk
        sent = app.result()
    finally:
        chain.release()
    assert len(received) == 4 * MIB and sent[0]["bytes"] == 4 * MIB
    assert not chain.pair.leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTERNAL)
@pytest.mark.parametrize("side", ["PROD", "CONS"])
def test_a_peer_with_the_wrong_certificate_is_refused(gateway_root, producer_app, tmp_path,
                                                      name, side):
    """Pinning: a backend told to trust another certificate than its real peer's
    refuses the real peer, so no byte reaches the consumer app."""
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    prod, cons = (name, "native") if side == "PROD" else ("native", name)
    producer, consumer = chain_gateways(gateway_root, prod, cons)
    app = producer_app(1, 1 * MIB)
    chain = LocalPair(producer, consumer).reserve(1)
    wrong = impostor(tmp_path)
    try:
        if side == "PROD":
            chain.connect(app.listeners, prod_peer=wrong)
        else:
            chain.connect(app.listeners, cons_peer=wrong)
        code, received = run_consumer(chain.cons["listeners"], timeout=60)
        statuses = chain.status()
    finally:
        chain.release()
    # Not one byte reaches the consumer app. The native proxy resets its connection;
    # HAProxy and nginx, as TLS clients refused, close it without an error.
    assert received[0].get("bytes", 0) == 0, received
    assert code != 0 or side == "CONS", received
    if side == "PROD":
        # Refused in the handshake: the producer app never got a connection.
        assert app.proc.poll() is None
    # (nginx as a TLS client checks the server's certificate after the handshake, so
    # the native producer proxy may already have dialled the app when nginx hangs up.)
    assert all(s["alive"] for s in statuses)
    assert not chain.pair.leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTERNAL)
def test_a_killed_proxy_is_reported_dead_and_release_cleans_up(gateway_root, producer_app, name):
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer, consumer = chain_gateways(gateway_root, name, name)
    app = producer_app(1, 1 << 34)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        with connect_early(chain.cons["listeners"][0]) as sock:
            assert len(sock.recv(65536)) > 0  # data flows
            pid = producer.call("status", {"uid": chain.uid})["pid"]
            identity = ProcessIdentity.of(pid)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while identity.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            status = producer.call("status", {"uid": chain.uid})
    finally:
        chain.release()
    assert status["alive"] is False and status["state"] == "FAILED", status_line(status)
    # nginx's worker outlives a killed master on its own: release must stop it too.
    assert not chain.pair.leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stunnel", "haproxy"])
def test_a_rate_is_refused_where_the_backend_cannot_enforce_it(gateway_root, name):
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    gateway = make_gateway(gateway_root, f"gw-{name}", backend=name)
    consumer = make_gateway(gateway_root, "cons-native")
    with pytest.raises(NotImplementedHere, match="cannot enforce a rate"):
        LocalPair(gateway, consumer).reserve(2, rate=8000)
    info = gateway.call("gateway_info", {})
    assert info["active_streams"] == 0 and info["free_ports"] == 40
    assert list((gateway.settings.state_dir / "streams").iterdir()) == []


@pytest.mark.slow
@needs("nginx")
def test_nginx_enforces_the_rate_per_connection(gateway_root, producer_app):
    """nginx limits each connection to rate / num_conn, so the stream stays within its
    rate. nginx counts whole seconds from the connection's start and grants one second
    up front, so by time t a connection has been allowed at most rate * (t + 2): 8 MiB
    over 2 connections at 16 Mbit/s (1 MB/s each) cannot finish before 2.19 s, however
    fast or loaded the machine (unlimited it takes milliseconds)."""
    producer, consumer = chain_gateways(gateway_root, "nginx", "native")
    total = 8 * MIB
    app = producer_app(2, total)
    chain = LocalPair(producer, consumer).reserve(2, rate=16_000)
    try:
        chain.connect(app.listeners)
        conf = (producer.settings.state_dir / "streams" / chain.uid / "nginx.conf").read_text()
        started = time.monotonic()
        code, received = run_consumer(chain.cons["listeners"])
        elapsed = time.monotonic() - started
    finally:
        chain.release()
    assert "proxy_download_rate 1000000;" in conf  # 16 Mbit/s / 2 connections, bytes/s
    assert code == 0 and sum(r["bytes"] for r in received) == total
    assert elapsed >= 2.0, elapsed


@pytest.mark.slow
@needs("stunnel")
def test_stunnel_refuses_plain_tcp_by_name(gateway_root, producer_app):
    producer, consumer = chain_gateways(gateway_root, "stunnel", "native")
    app = producer_app(1, 1024)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        with pytest.raises(NotImplementedHere, match="without TLS"):
            chain.connect(app.listeners, tls=False)
        # The refused connect carried the producer's hello: nothing of it was kept.
        assert producer.call("status", {"uid": chain.uid})["state"] == "RESERVED"
    finally:
        chain.release()
    assert not chain.pair.leftovers()


@pytest.mark.slow
@needs("haproxy")
def test_haproxy_reports_live_byte_counters(gateway_root, producer_app):
    producer, consumer = chain_gateways(gateway_root, "haproxy", "haproxy")
    total = 8 * MIB
    app = producer_app(1, total)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        code, _ = run_consumer(chain.cons["listeners"])
        prod_status, cons_status = chain.status()
    finally:
        chain.release()
    assert code == 0
    assert prod_status["bytes"]["to_app"] == 0 and prod_status["bytes"]["from_app"] == total
    assert cons_status["bytes"]["to_app"] == total and cons_status["bytes"]["from_app"] == 0
    assert cons_status["connections"]["total"] == 1


def test_gateway_info_reports_which_backends_are_usable(gateways):
    """Checked against what this machine has, looked up here, not asked of the backends."""
    info = gateways[0].call("gateway_info", {})
    backends = info["backends"]
    assert set(backends) == {"native", "stunnel", "haproxy", "nginx",
                             "haproxy-docker", "nginx-docker"}
    assert backends["native"] == {"available": True, "reason": None}
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for name, binaries in {"stunnel": ("stunnel4", "stunnel"), "haproxy": ("haproxy",),
                           "nginx": ("nginx",)}.items():
        entry = backends[name]
        if not any(shutil.which(b, path=search) for b in binaries):
            assert entry["available"] is False and "not found on PATH" in entry["reason"]
        elif name == "nginx" and not entry["available"]:  # a build without its stream module
            assert "stream module" in entry["reason"], entry
        else:
            assert entry == {"available": True, "reason": None}, (name, entry)
    engine = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")  # the SDK default
    for name in ("haproxy-docker", "nginx-docker"):
        entry = backends[name]
        assert entry["available"] is (entry["reason"] is None), (name, entry)
        if engine.startswith("unix://") and not Path(engine[len("unix://"):]).exists():
            assert entry["available"] is False, (name, entry)


def test_an_unknown_backend_in_the_settings_is_refused(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nname = "x"\nstate_dir = "/s"\nbackend = "stunel"\n')
    with pytest.raises(ServerError, match="backend must be one of"):
        GatewaySettings.from_toml(path)


def test_a_missing_binary_makes_reserve_unavailable(gateway_root, monkeypatch):
    """The gateway looks the binary up on its own PATH: without it, reserve is
    UNAVAILABLE, names what is missing, and takes nothing."""
    from scistream_gateway.errors import Unavailable

    gateway = make_gateway(gateway_root, "gw-nobinary", backend="stunnel")
    empty = gateway_root / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # the gateway's workers start with this PATH
    with pytest.raises(Unavailable, match="stunnel4 or stunnel not found"):
        LocalPair(gateway, make_gateway(gateway_root, "cons-native")).reserve(1)
    info = gateway.call("gateway_info", {})
    assert info["backends"]["stunnel"]["available"] is False
    assert info["active_streams"] == 0 and info["free_ports"] == 40



def test_the_holder_steers_a_reuseport_group_to_the_proxys_socket():
    """The classic-BPF program the holder attaches for container backends: once a
    second socket (the container's) joins the port, every new connection goes to it."""
    from scistream_proxy.holder import _attach_steering

    def listener(port: int = 0) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        return sock

    held = listener()
    port = held.getsockname()[1]
    _attach_steering(held)
    early = socket.create_connection(("127.0.0.1", port))  # only the holder listens yet
    proxy = listener(port)
    late = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    try:
        held.setblocking(False)
        proxy.settimeout(5)
        accepted_by_proxy = [proxy.accept()[0] for _ in late]
        queued_at_holder = []
        while True:
            try:
                queued_at_holder.append(held.accept()[0])
            except BlockingIOError:
                break
        assert len(accepted_by_proxy) == 16
        assert len(queued_at_holder) == 1  # the early one, and only it
        for conn in accepted_by_proxy + queued_at_holder:
            conn.close()
    finally:
        for sock in [early, held, proxy, *late]:
            sock.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTERNAL)
def test_configs_and_keys_are_private(gateway_root, producer_app, name):
    """Everything a backend writes into the 0700 stream directory is 0600; only the two
    certificates (public by nature) and sockets are not."""
    import stat

    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer, consumer = chain_gateways(gateway_root, name, name)
    app = producer_app(1, 1024)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        for gw in (producer, consumer):
            directory = gw.settings.state_dir / "streams" / chain.uid
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            written = {}
            for path in directory.iterdir():
                mode = path.lstat().st_mode
                if stat.S_ISREG(mode) and path.name not in ("cert.pem", "peer.pem"):
                    written[path.name] = stat.S_IMODE(mode)
            assert written and set(written.values()) == {0o600}, written
            assert {"key.pem", "launch.json"} <= set(written)
    finally:
        chain.release()
    assert not chain.pair.leftovers()


@pytest.mark.slow
def test_the_backend_bench_stays_runnable(tmp_path):
    """A tiny run of bench/backends.py (no figure asserted, only that it measured)."""
    import json
    import subprocess
    import sys

    bench = Path(__file__).parent.parent / "bench" / "backends.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--backends", "native,haproxy", "--streams", "1",
         "--rounds", "1", "--bytes", "1MiB", "--num-conn", "2", "--port-base", "21000",
         "--json"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)["backends"]
    assert result["native"]["setup_s"]["n"] == 1
    assert result["native"]["throughput_gbit_s"] > 0
    # Whether haproxy can run is this machine's fact, not the bench's to decide.
    if shutil.which("haproxy", path=os.pathsep.join([os.environ["PATH"], "/usr/sbin", "/sbin"])):
        assert result["haproxy"].get("throughput_gbit_s", 0) > 0, result["haproxy"]
    else:
        assert "skipped" in result["haproxy"], result["haproxy"]
