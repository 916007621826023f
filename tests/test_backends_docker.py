"""The container backends (haproxy-docker, nginx-docker) against a real Docker engine.

The engine (``DOCKER_HOST``, which scripts/with-test-env sets to
``unix:///tmp/docker.sock``) runs in the root network namespace, so these tests do too
and use ports 18000-21999, which no other suite uses. Images come from
``python -m scistream_proxy.images build``.
"""

from __future__ import annotations

import itertools
import os
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
    status_line,
)
from conftest import run_consumer
from dockerkit import containers_of, needs, skip_reason
from scistream_gateway.errors import NotImplementedHere, Unavailable
from scistream_prefect import LocalGateway, LocalPair

pytestmark = pytest.mark.docker

CONTAINER = ("haproxy-docker", "nginx-docker")
_SLICES = itertools.count(18000, 40)


def make_gateway(root: Path, name: str, **settings) -> LocalGateway:
    base = next(_SLICES)
    assert base + 39 <= 21999, "the Docker suite ran out of its port range"
    return LocalGateway.create(name, root / name, port_range=(base, base + 39), **settings)


@pytest.fixture
def docker_root(gateway_root: Path):
    """gateway_root, and afterwards no container of this test's gateways may be left."""
    yield gateway_root
    left = containers_of(gateway_root)
    for container in left:
        container.remove(force=True)
    assert not left, f"containers left: {[c.name for c in left]}"


def pairs():
    for name in CONTAINER:
        for prod, cons in (("native", name), (name, "native"), (name, name)):
            for tls in (True, False):
                yield pytest.param(prod, cons, tls, id=f"{prod}-{cons}-{'tls' if tls else 'plain'}",
                                   marks=needs(prod, cons))


def chain_gateways(root: Path, prod: str, cons: str):
    # Plain TCP allowed: the chains are tested with and without TLS.
    return (make_gateway(root, f"prod-{prod}", backend=prod, allow_plain_tcp=True),
            make_gateway(root, f"cons-{cons}", backend=cons, allow_plain_tcp=True))


@pytest.mark.parametrize("prod, cons, tls", list(pairs()))
def test_checksummed_transfer_through_every_pairing(docker_root, producer_app, prod, cons, tls):
    producer, consumer = chain_gateways(docker_root, prod, cons)
    chain, _, running = round_robin_transfer(producer, consumer, producer_app, tls,
                                             while_connected=lambda: containers_of(docker_root))
    assert len(running) == sum(b.endswith("-docker") for b in (prod, cons))  # one per end
    for container in running:
        assert container.labels["org.scistream.uid"] == chain.uid
        assert container.labels["org.scistream.gateway"] in (f"prod-{prod}", f"cons-{cons}")
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert not chain.pair.leftovers()


@pytest.mark.parametrize("name", CONTAINER)
def test_a_killed_container_is_reported_dead_and_release_removes_it(docker_root, producer_app,
                                                                     name):
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer, consumer = chain_gateways(docker_root, name, "native")
    app = producer_app(1, 1 << 34)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        with connect_early(chain.cons["listeners"][0]) as sock:
            assert len(sock.recv(65536)) > 0
            (container,) = containers_of(docker_root)
            container.kill()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = producer.call("status", {"uid": chain.uid})
                if not status["alive"]:
                    break
                time.sleep(0.1)
    finally:
        chain.release()
    assert status["alive"] is False and status["state"] == "FAILED", status_line(status)
    assert containers_of(docker_root) == []
    assert not chain.pair.leftovers()


@pytest.mark.parametrize("name", CONTAINER)
def test_ports_are_held_until_the_container_takes_them(docker_root, producer_app, name):
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer, consumer = chain_gateways(docker_root, "native", name)
    app = producer_app(1, 2 * MIB)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        assert holds_port(chain.cons["listeners"][0])
        assert containers_of(docker_root) == []  # no container before connect
        chain.connect(app.listeners)
        assert holds_port(chain.cons["listeners"][0])
        code, received = run_consumer(chain.cons["listeners"])
    finally:
        chain.release()
    assert code == 0 and received[0]["bytes"] == 2 * MIB
    assert not chain.pair.leftovers()


@pytest.mark.parametrize("name", CONTAINER)
def test_a_peer_with_the_wrong_certificate_is_refused(docker_root, producer_app, tmp_path, name):
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer, consumer = chain_gateways(docker_root, name, "native")
    app = producer_app(1, 1 * MIB)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners, prod_peer=impostor(tmp_path))
        code, received = run_consumer(chain.cons["listeners"], timeout=60)
    finally:
        chain.release()
    assert code != 0 and received[0].get("bytes", 0) == 0, received
    assert app.proc.poll() is None  # refused in the handshake: the app was never dialled
    assert not chain.pair.leftovers()


@needs("haproxy-docker")
def test_haproxy_docker_refuses_a_rate(docker_root):
    gateway = make_gateway(docker_root, "gw-hd", backend="haproxy-docker")
    with pytest.raises(NotImplementedHere, match="cannot enforce a rate"):
        LocalPair(gateway, make_gateway(docker_root, "cons-native")).reserve(1, rate=8000)
    assert gateway.call("gateway_info", {})["active_streams"] == 0


@needs("nginx-docker")
def test_nginx_docker_enforces_the_rate(docker_root, producer_app):
    """4 MiB over one connection at 8 Mbit/s (1 MB/s): nginx allows at most
    rate * (t + 2) by time t (whole seconds, one granted up front), so it cannot finish
    before 2.19 s: a lower bound on time, never a speed."""
    producer, consumer = chain_gateways(docker_root, "nginx-docker", "native")
    total = 4 * MIB
    app = producer_app(1, total)
    chain = LocalPair(producer, consumer).reserve(1, rate=8_000)
    try:
        chain.connect(app.listeners)
        started = time.monotonic()
        code, received = run_consumer(chain.cons["listeners"])
        elapsed = time.monotonic() - started
    finally:
        chain.release()
    assert code == 0 and received[0]["bytes"] == total
    assert elapsed >= 2.0, elapsed
    assert not chain.pair.leftovers()


@needs("haproxy-docker")
def test_haproxy_docker_reports_byte_counters(docker_root, producer_app):
    producer, consumer = chain_gateways(docker_root, "haproxy-docker", "native")
    total = 4 * MIB
    app = producer_app(1, total)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        code, _ = run_consumer(chain.cons["listeners"])
        status = producer.call("status", {"uid": chain.uid})
    finally:
        chain.release()
    assert code == 0
    assert status["bytes"] == {"to_app": 0, "from_app": total}


def test_no_engine_is_unavailable_and_takes_nothing(docker_root, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{docker_root}/no-engine.sock")
    gateway = make_gateway(docker_root, "gw-noengine", backend="nginx-docker")
    with pytest.raises(Unavailable, match="no Docker engine answers"):
        LocalPair(gateway, make_gateway(docker_root, "cons-native")).reserve(1)
    info = gateway.call("gateway_info", {})
    assert info["backends"]["nginx-docker"]["available"] is False
    assert info["active_streams"] == 0 and info["free_ports"] == 40


@needs("nginx-docker")
def test_a_missing_image_is_named():
    from scistream_proxy.docker_backends import NginxDockerBackend

    class Unbuilt(NginxDockerBackend):
        image_kind = "never-built"

    assert "scistream-never-built:1 is missing" in Unbuilt().unavailable_reason()


@pytest.mark.parametrize("name", CONTAINER)
def test_a_connection_before_connect_is_reset_not_silently_dropped(docker_root, producer_app,
                                                                   name):
    """A container cannot inherit the holder's socket: an app that connects before
    connect returned is reset at the handoff (or, where the kernel migrates queued
    connections, net.ipv4.tcp_migrate_req=1, served). Never a clean, empty end."""
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer, consumer = chain_gateways(docker_root, "native", name)
    app = producer_app(1, 1 * MIB)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        early = connect_early(chain.cons["listeners"][0])
        chain.connect(app.listeners)
        received = 0
        with early:
            try:
                while chunk := early.recv(MIB):
                    received += len(chunk)
                outcome = "served"
            except ConnectionResetError:
                outcome = "reset"
        log = (consumer.settings.state_dir / "streams" / chain.uid / "holder.log").read_text()
    finally:
        chain.release()
    if outcome == "served":
        assert received == MIB
    else:
        assert received == 0 and "reset 1 connection" in log
    assert not chain.pair.leftovers()


@needs("nginx-docker")
def test_an_engine_that_went_away_is_unavailable_and_loses_nothing(docker_root, producer_app,
                                                                    monkeypatch):
    """status and release while the engine cannot be reached: UNAVAILABLE, the stream
    and its container stay as they were (not reported dead), and a later release
    removes everything."""
    from scistream_gateway.errors import Unavailable as UnavailableError

    producer, consumer = chain_gateways(docker_root, "nginx-docker", "native")
    app = producer_app(1, 1024)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        monkeypatch.setenv("DOCKER_HOST", f"unix://{docker_root}/no-engine.sock")
        # Another pool of workers for the same gateway, started without an engine.
        cut_off = LocalGateway(settings_path=producer.settings_path, workers=3)
        with pytest.raises(UnavailableError, match="no Docker engine answers"):
            cut_off.call("status", {"uid": chain.uid})
        with pytest.raises(UnavailableError, match="cannot release"):
            cut_off.call("release", {"uid": chain.uid})
        monkeypatch.undo()
        status = producer.call("status", {"uid": chain.uid})
        assert status["state"] == "CONNECTED" and status["alive"] is True
        assert len(containers_of(docker_root)) == 1
    finally:
        chain.release()
    assert not chain.pair.leftovers()


@pytest.mark.parametrize("name", CONTAINER)
def test_containers_run_as_the_gateway_user_without_privileges(docker_root, producer_app, name):
    """docker inspect and the kernel's own view of the proxy: the gateway's uid:gid, no
    capabilities, no-new-privileges, the pids and memory limits of the settings; and
    the stream still flows."""
    if skip_reason(name):
        pytest.skip(skip_reason(name))
    producer = make_gateway(docker_root, f"prod-{name}", backend=name,
                            container_pids_limit=64, container_memory_mib=256)
    consumer = make_gateway(docker_root, "cons-native")
    app = producer_app(1, 2 * MIB)
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        (container,) = containers_of(docker_root)
        host, config = container.attrs["HostConfig"], container.attrs["Config"]
        pid = container.attrs["State"]["Pid"]
        kernel = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
        code, received = run_consumer(chain.cons["listeners"])
    finally:
        chain.release()
    assert config["User"] == f"{os.getuid()}:{os.getgid()}"
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] == 64
    assert host["Memory"] == host["MemorySwap"] == 256 * MIB
    assert kernel["Uid"].split()[1] == str(os.getuid())  # effective uid
    assert kernel["CapEff"].strip() == kernel["CapPrm"].strip() == "0" * 16
    assert kernel["NoNewPrivs"].strip() == "1"
    assert code == 0 and received[0]["bytes"] == 2 * MIB
    assert not chain.pair.leftovers()


def test_the_engine_is_never_a_default_path_in_tmp(monkeypatch):
    """Without docker_host or DOCKER_HOST the engine is the Docker SDK's standard
    socket (any local user could create /tmp/docker.sock first)."""
    from scistream_proxy.docker_backends import NginxDockerBackend

    monkeypatch.delenv("DOCKER_HOST", raising=False)
    if os.path.exists("/var/run/docker.sock"):
        pytest.skip("an engine listens at the standard socket here")
    reason = NginxDockerBackend().unavailable_reason()
    assert "unix:///var/run/docker.sock" in reason and "/tmp" not in reason


def _own_engine() -> str:
    """DOCKER_HOST when it is a unix socket this user owns (a rootless engine, or root's
    own engine when the tests run as root), else skip."""
    engine = os.environ.get("DOCKER_HOST", "")
    path = engine.removeprefix("unix://")
    if not engine.startswith("unix://") or not os.path.exists(path) \
            or os.stat(path).st_uid != os.getuid():
        pytest.skip(f"DOCKER_HOST {engine!r} is not a unix socket owned by uid {os.getuid()}")
    return engine


@needs("nginx-docker")
def test_a_shared_gateway_runs_containers_on_an_engine_it_owns(docker_root, producer_app):
    producer = make_gateway(docker_root, "prod-shared", backend="nginx-docker", shared=True,
                            docker_host=_own_engine())
    app = producer_app(1, 1 * MIB)
    chain = LocalPair(producer, make_gateway(docker_root, "cons-native")).reserve(1)
    try:
        chain.connect(app.listeners)
        assert len(containers_of(docker_root)) == 1
        code, received = run_consumer(chain.cons["listeners"])
    finally:
        chain.release()
    assert code == 0 and received[0]["bytes"] == MIB
    assert not chain.pair.leftovers()


@pytest.mark.root
def test_a_shared_gateway_refuses_an_engine_it_does_not_own(docker_root, tmp_path):
    """A socket of another user (as /tmp/docker.sock could be) or no engine named:
    the container backends are unavailable, with the reason, and reserve takes nothing."""
    foreign = tmp_path / "foreign.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(foreign))
    os.chown(foreign, 65534, 65534)
    shared = make_gateway(docker_root, "gw-foreign", backend="nginx-docker", shared=True,
                          docker_host=f"unix://{foreign}")
    with pytest.raises(Unavailable, match="is not a socket owned by uid 0: a shared gateway"):
        LocalPair(shared, make_gateway(docker_root, "cons-native")).reserve(1)
    info = shared.call("gateway_info", {})
    assert info["active_streams"] == 0 and info["free_ports"] == 40
    for name in CONTAINER:
        assert info["backends"][name]["available"] is False
        assert "not a socket owned by uid 0" in info["backends"][name]["reason"]
    # A shared gateway that names no engine: the same, whatever DOCKER_HOST says.
    native = make_gateway(docker_root, "gw-shared-native", shared=True)
    info = native.call("gateway_info", {})
    assert info["backends"]["native"]["available"] is True
    for name in CONTAINER:
        assert info["backends"][name]["available"] is False
        assert "settings name (docker_host)" in info["backends"][name]["reason"]
