"""Gateway-side faults with the container backends (haproxy-docker, nginx-docker) and a
real Docker engine: a worker killed after it started a container it never recorded, a
container left without a stream at a restart, a killed container.

The engine's containers use host networking in the root network namespace, so these
tests run there (skipped, naming why, elsewhere) and use ports 11500-12999.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from scistream_gateway.errors import Unavailable
from scistream_gateway.service import FAULTS_ENV
from scistream_prefect import LocalGateway, LocalPair
from scistream_proxy.leaks import port_is_free, working_dirs
from dockerkit import containers_of, skip_reason
from gatewaykit import kill_workers, plant

pytestmark = pytest.mark.docker

CONTAINER = ("haproxy-docker", "nginx-docker")
_SLICES = itertools.count(11500, 20)
KEY = "docker-fault-key"


def make_gateway(root: Path, name: str, **settings) -> LocalGateway:
    base = next(_SLICES)
    assert base + 19 <= 12999, "the Docker fault tests ran out of their port range"
    return LocalGateway.create(name, root / name, port_range=(base, base + 19), **settings)


def _skip(name: str) -> None:
    reason = skip_reason(name)
    if reason:
        pytest.skip(reason)


def _request(uid: str, role: str) -> dict:
    return {"uid": uid, "role": role, "num_conn": 1,
            "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}


def _connect(gw, uid: str, peer: dict) -> dict:
    return gw.call("connect", {"uid": uid, "remote_listeners": peer["listeners"],
                               "peer_certificate": peer["certificate"],
                               "peer_fingerprint": peer["cert_fingerprint"]})


@pytest.mark.parametrize("name", CONTAINER)
def test_a_worker_killed_after_starting_a_container_leaves_none(gateway_root, monkeypatch,
                                                                name):
    """The worker dies after the container runs and before its id is recorded: the next
    call on the gateway finds it by its labels and removes it; the stream is FAILED
    with its ports free."""
    _skip(name)
    monkeypatch.setenv(FAULTS_ENV, "1")
    producer = make_gateway(gateway_root, "prod")
    consumer = make_gateway(gateway_root, "cons", backend=name)
    uid = str(uuid.uuid4())
    prod = producer.call("reserve", _request(uid, "PROD"))
    cons = consumer.call("reserve", _request(uid, "CONS"))
    plant(consumer, "connect:proxy-connected")
    try:
        with pytest.raises(Unavailable, match="died during connect"):
            _connect(consumer, uid, prod)
        assert len(containers_of(gateway_root)) == 1  # it runs, unrecorded
        status = consumer.call("status", {"uid": uid})
        assert status["state"] == "FAILED" and status["error_code"] == "CONN_ERROR"
        assert containers_of(gateway_root) == []
        assert port_is_free(cons["listeners"][0])
        assert working_dirs(consumer.settings.state_dir / "streams") == {}
    finally:
        for gw in (producer, consumer):
            gw.call("release", {"uid": uid})
    assert containers_of(gateway_root) == []


@pytest.mark.parametrize("name", CONTAINER)
def test_a_worker_killed_mid_reserve_leaves_no_port_holder(gateway_root, monkeypatch, name):
    _skip(name)
    monkeypatch.setenv(FAULTS_ENV, "1")
    gw = make_gateway(gateway_root, "cons", backend=name)
    uid = str(uuid.uuid4())
    plant(gw, "reserve:proxy-started")
    with pytest.raises(Unavailable, match="died during reserve"):
        gw.call("reserve", _request(uid, "CONS"))
    assert working_dirs(gw.settings.state_dir / "streams")  # its port holder, unrecorded
    assert gw.call("gateway_info", {})["active_streams"] == 0
    assert working_dirs(gw.settings.state_dir / "streams") == {}
    assert gw.call("reserve", _request(uid, "CONS"))["uid"] == uid  # usable again
    gw.call("release", {"uid": uid})
    assert gw.call("gateway_info", {})["free_ports"] == 20


def test_a_restart_removes_a_container_of_no_stream_and_keeps_the_live_one(gateway_root):
    _skip("haproxy-docker")
    producer = make_gateway(gateway_root, "prod")
    consumer = make_gateway(gateway_root, "cons", backend="haproxy-docker")
    pair = LocalPair(producer, consumer)
    kept, lost = pair.reserve(1), pair.reserve(1)
    try:
        for chain in (kept, lost):
            chain.connect(["127.0.0.1:9"])
        assert len(containers_of(gateway_root)) == 2
        kill_workers(consumer)
        # The record of one stream is lost while the gateway is down (a restored backup).
        with sqlite3.connect(consumer.settings.state_dir / "state.sqlite3") as db:
            db.execute("DELETE FROM ports WHERE uid = ?", (lost.uid,))
            db.execute("DELETE FROM streams WHERE uid = ?", (lost.uid,))
        assert consumer.call("gateway_info", {})["active_streams"] == 1
        left = containers_of(gateway_root)
        assert [c.labels["org.scistream.uid"] for c in left] == [kept.uid]
        assert port_is_free(lost.cons["listeners"][0])
        assert not (consumer.settings.state_dir / "streams" / lost.uid).exists()
        assert consumer.call("status", {"uid": kept.uid})["alive"]
    finally:
        kept.release()
        lost.release()
    assert containers_of(gateway_root) == []
    assert not kept.pair.leftovers()


def test_a_killed_container_is_failed_at_the_next_workers_first_call(gateway_root):
    _skip("nginx-docker")
    producer = make_gateway(gateway_root, "prod")
    consumer = make_gateway(gateway_root, "cons", backend="nginx-docker")
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(["127.0.0.1:9"])
        pid = consumer.call("status", {"uid": chain.uid})["pid"]
        kill_workers(consumer)
        os.kill(pid, signal.SIGKILL)  # the container's first process: the container stops
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                c.status == "running" for c in containers_of(gateway_root)
                if c.labels["org.scistream.role"] == "CONS"):
            time.sleep(0.05)
        status = consumer.call("status", {"uid": chain.uid})
        assert status["state"] == "FAILED" and "reconciled" in status["last_error"], status
        assert port_is_free(chain.cons["listeners"][0])
    finally:
        chain.release()
    assert containers_of(gateway_root) == []
    assert not chain.pair.leftovers()
