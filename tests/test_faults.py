"""Gateway-side faults: a worker killed at each point of reserve and connect, a proxy
killed mid-transfer, a restart with streams running, an unreachable or impostor peer,
wrong and replayed hellos, and the state schema's migration. Real worker processes
(LocalGateway and globus-compute-endpoint's ProcessPoolEngine), real proxies, SQLite.
See docs/faults.md."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from backend_chain import (
    impostor,
    skip_reason,
)
from conftest import make_gateway
from gatewaykit import ProvenEngine, kill_workers, plant
from scistream_gateway.errors import AuthError, BadFormat, InvalidUid, Unavailable
from scistream_gateway.service import FAULT_STEPS, FAULTS_ENV, Gateway
from scistream_gateway.settings import CONFIG_ENV
from scistream_gateway.store import SCHEMA_VERSION, Store
from scistream_prefect import LocalPair
from scistream_prefect.ownership import with_proofs
from scistream_proxy.apps import EchoServer
from scistream_proxy.backends import ProxySpec
from scistream_proxy.leaks import port_is_free, proxy_pids, working_dirs
from scistream_proxy.native_backend import NativeBackend
from scistream_proxy.process import ProcessIdentity

KEY = "fault-test-key"


@pytest.fixture
def faults_on(monkeypatch):
    """Workers started from now on honour fault files (they inherit the environment)."""
    monkeypatch.setenv(FAULTS_ENV, "1")


def rows(gw) -> dict:
    with sqlite3.connect(gw.settings.state_dir / "state.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return {r["uid"]: dict(r) for r in db.execute("SELECT * FROM streams")}


def roundtrip(address: str, payload: bytes = b"p" * 100_000) -> bytes | str:
    host, _, port = address.rpartition(":")
    back = bytearray()
    try:
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
            while len(back) < len(payload):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return "eof"
                back += chunk
    except OSError as exc:
        return type(exc).__name__
    return bytes(back)


@pytest.fixture
def echo():
    app = EchoServer()
    yield app
    app.sock.close()


# -- a worker dies at each fault point ------------------------------------------------------
def _request(uid: str, role: str, num_conn: int = 2) -> dict:
    return {"uid": uid, "role": role, "num_conn": num_conn,
            "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}


RESERVE_STEPS = [step for step in FAULT_STEPS if step.startswith("reserve:")]
CONNECT_STEPS = [step for step in FAULT_STEPS if step.startswith("connect:")]


def test_every_fault_point_is_tested():
    assert sorted(RESERVE_STEPS + CONNECT_STEPS) == sorted(FAULT_STEPS)


def _gateway_pair(gateway_root, backend: str):
    if backend != "native" and skip_reason(backend):
        pytest.skip(skip_reason(backend))
    return (make_gateway(gateway_root, "prod", backend=backend),
            make_gateway(gateway_root, "cons", backend=backend))


def _connect_request(uid: str, peer: dict) -> dict:
    return {"uid": uid, "remote_listeners": peer["listeners"],
            "peer_certificate": peer["certificate"], "peer_fingerprint": peer["cert_fingerprint"]}


def _left_by_the_dead_worker(gw, uid: str, fault: Path, step: str) -> tuple[str, list[str]]:
    """The worker took the fault and died there; its row still names it (until the next
    call) and, past the proxy's start, the proxy or port holder has the ports. Returns the
    row's state and listeners."""
    assert not fault.exists()
    row = rows(gw)[uid]
    busy = json.loads(row["busy"])
    assert not ProcessIdentity(busy["pid"], busy["start_time"]).alive()
    listeners = json.loads(row["listeners"])
    if step.endswith(("proxy-started", "proxy-connected", "marked")):
        assert not port_is_free(listeners[0])
    return row["state"], listeners


def _nothing_left(gateway_root, *gws) -> None:
    for gw in gws:
        assert gw.call("gateway_info", {})["active_streams"] == 0
        assert list((gw.settings.state_dir / "streams").iterdir()) == []
    assert proxy_pids(under=gateway_root) == []


@pytest.mark.parametrize("backend", ["native", pytest.param("stunnel", marks=pytest.mark.slow)])
@pytest.mark.parametrize("step", [pytest.param(step, marks=[pytest.mark.slow] * (i > 0))
                                  for i, step in enumerate(RESERVE_STEPS)])
def test_a_worker_killed_during_reserve_is_undone_by_the_next_call(gateway_root, faults_on,
                                                                  echo, step, backend):
    """The consumer end's worker dies at ``step`` of reserve; the next call on that gateway,
    whatever it is, removes the half-made stream, and the client may retry the same uid."""
    producer, consumer = _gateway_pair(gateway_root, backend)
    state = consumer.settings.state_dir
    uid = str(uuid.uuid4())
    try:
        prod = producer.call("reserve", _request(uid, "PROD"))
        fault = plant(consumer, step)
        with pytest.raises(Unavailable, match="died during reserve"):
            consumer.call("reserve", _request(uid, "CONS"))
        row_state, dead_listeners = _left_by_the_dead_worker(consumer, uid, fault, step)
        assert row_state == "STARTING"

        assert consumer.call("gateway_info", {})["active_streams"] == 0
        assert uid not in rows(consumer)
        cons = consumer.call("reserve", _request(uid, "CONS"))
        producer.call("hello", {"uid": uid, "key": KEY, "role": "PROD",
                                "app_listeners": [echo.address]})
        producer.call("connect", _connect_request(uid, cons))
        consumer.call("connect", _connect_request(uid, prod))
        assert roundtrip(cons["listeners"][0]) == b"p" * 100_000
        # The relay holds the retried stream and nothing of the dead call's.
        relayed = NativeBackend.relay_streams(state)
        assert relayed == ([uid] if backend == "native" else None), relayed
        assert all(port_is_free(a) for a in dead_listeners if a not in cons["listeners"])
    finally:
        for gw in (producer, consumer):
            gw.call("release", {"uid": uid})
    _nothing_left(gateway_root, producer, consumer)


@pytest.mark.parametrize("backend", ["native", pytest.param("stunnel", marks=pytest.mark.slow)])
@pytest.mark.parametrize("step", [pytest.param(step, marks=[pytest.mark.slow] * (i > 0))
                                  for i, step in enumerate(CONNECT_STEPS)])
def test_a_worker_killed_during_connect_fails_the_stream_and_frees_it(gateway_root, faults_on,
                                                                     step, backend):
    """The consumer end's worker dies at ``step`` of connect; the next call on that gateway
    turns the stream FAILED and frees its ports, files and proxy before any release."""
    producer, consumer = _gateway_pair(gateway_root, backend)
    state = consumer.settings.state_dir
    uid = str(uuid.uuid4())
    try:
        prod = producer.call("reserve", _request(uid, "PROD"))
        consumer.call("reserve", _request(uid, "CONS"))
        fault = plant(consumer, step)
        with pytest.raises(Unavailable, match="died during connect"):
            consumer.call("connect", _connect_request(uid, prod))
        row_state, dead_listeners = _left_by_the_dead_worker(consumer, uid, fault, step)
        assert row_state == "RESERVED"

        status = consumer.call("status", {"uid": uid})
        assert status["state"] == "FAILED" and status["alive"] is False, status
        assert status["error_code"] == "CONN_ERROR" and "worker" in status["last_error"]
        with pytest.raises(InvalidUid, match="FAILED"):
            consumer.call("connect", _connect_request(uid, prod))
        assert all(port_is_free(a) for a in dead_listeners)
        assert not (state / "streams" / uid).exists()
        assert working_dirs(state / "streams") == {}
        assert not NativeBackend.relay_streams(state)
    finally:
        for gw in (producer, consumer):
            gw.call("release", {"uid": uid})
    _nothing_left(gateway_root, producer, consumer)


@pytest.mark.slow
def test_a_worker_of_the_endpoint_engine_killed_mid_reserve_is_undone_after_restart(
        gateway_root):
    """Through globus-compute-endpoint's own ProcessPoolEngine: the worker dies after
    the proxy took the ports; the pool breaks (as an endpoint's does); the restarted
    endpoint's first call removes the proxy's stream and frees the ports."""
    gw = make_gateway(gateway_root, "engine-gw")
    plant(gw, "reserve:proxy-started")
    environ = {CONFIG_ENV: str(gw.settings_path), FAULTS_ENV: "1"}
    uid = str(uuid.uuid4())
    request = {"uid": uid, "role": "CONS", "num_conn": 3,
               "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    with ProvenEngine(environ, max_workers=1) as engine:
        with pytest.raises(RuntimeError, match="terminated abruptly|BrokenProcessPool"):
            engine.call("reserve", request)
    listeners = json.loads(rows(gw)[uid]["listeners"])
    assert not any(port_is_free(a) for a in listeners)  # the relay holds them, unrecorded
    assert NativeBackend.relay_streams(gw.settings.state_dir) == [uid]
    with ProvenEngine(environ) as engine:
        assert engine.call("gateway_info", {})["active_streams"] == 0
        assert all(port_is_free(a) for a in listeners)
        assert proxy_pids(under=gateway_root) == []  # it was the relay's only stream
        assert engine.call("reserve", request)["uid"] == uid  # the uid is usable again
        assert engine.call("release", {"uid": uid})["released"]


@pytest.mark.slow
def test_release_waits_for_a_call_in_progress_then_undoes_a_dead_one(gateways):
    """A connect in progress (its worker: here a stand-in process) holds release back;
    when that worker dies, release goes on; a live one past the wait is UNAVAILABLE."""
    producer, _ = gateways
    uid = str(uuid.uuid4())
    reply = producer.call("reserve", {"uid": uid, "role": "PROD", "num_conn": 1,
                                      "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()})
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        identity = None
        while identity is None:
            identity = ProcessIdentity.of(worker.pid)
        busy = json.dumps({"pid": worker.pid, "start_time": identity.start_time,
                           "op": "connect"})
        with sqlite3.connect(producer.settings.state_dir / "state.sqlite3") as db:
            db.execute("UPDATE streams SET busy = ? WHERE uid = ?", (busy, uid))
        with pytest.raises(Unavailable, match="in progress"):
            producer.call("connect", {"uid": uid, "remote_listeners": ["127.0.0.1:9"],
                                      "peer_certificate": reply["certificate"],
                                      "peer_fingerprint": reply["cert_fingerprint"]})
        done = []

        def release() -> None:
            reply = producer.call("release", {"uid": uid})
            done.append((time.monotonic(), reply))

        # With no worker left, the one that shows up is the release's, handed its call.
        producer.close()
        releaser = threading.Thread(target=release)
        releaser.start()
        deadline = time.monotonic() + 30
        while not producer.worker_pids():
            assert time.monotonic() < deadline, "no worker started for the release"
            time.sleep(0.01)
        time.sleep(1.0)
        assert not done  # waiting for the "connect"
        killed_at = time.monotonic()
        worker.kill()
        worker.wait()
        releaser.join(timeout=30)
        assert [reply for _, reply in done] == [{"uid": uid, "released": True}]
        assert done[0][0] > killed_at, "release returned before the call's worker died"
    finally:
        worker.kill()
    assert port_is_free(reply["listeners"][0])
    assert producer.call("status", {"uid": uid})["state"] == "RELEASED"


def test_release_gives_up_on_a_call_that_stays_in_progress(gateway_root, monkeypatch):
    import scistream_gateway.service as service

    gw = make_gateway(gateway_root, "patient-gw")
    monkeypatch.setattr(service, "RELEASE_WAIT_S", 0.3)
    uid = str(uuid.uuid4())
    with Gateway(gw.settings) as gateway:
        gateway.reserve(with_proofs("reserve", {"uid": uid, "role": "CONS", "num_conn": 1,
                                                "key_sha256": "0" * 64}))
        gateway.store.update(uid, busy={**service._this_worker(), "op": "connect"})
        with pytest.raises(Unavailable, match="still in progress"):
            gateway.release(with_proofs("release", {"uid": uid}))
        gateway.store.update(uid, busy=None)
        assert gateway.release(with_proofs("release", {"uid": uid}))["released"]


def test_a_call_that_finished_after_the_listing_is_not_undone(gateway_root, monkeypatch):
    """reap_abandoned lists busy rows, then undoes each inside a transaction: a row
    whose call finished in between (busy cleared) must be left alone, proxy and all."""
    gw = make_gateway(gateway_root, "race-gw")
    uid = str(uuid.uuid4())
    with Gateway(gw.settings) as gateway:
        reply = gateway.reserve(with_proofs("reserve", {"uid": uid, "role": "CONS",
                                                        "num_conn": 1, "key_sha256": "0" * 64}))
        gateway.store.update(uid, busy={"pid": 0, "start_time": 0, "op": "connect"})
        assert [st.uid for st in gateway.store.busy_streams()] == [uid]
        gateway.store.update(uid, busy=None)  # ... then the call ended normally,
        listed = [gateway.store.get(uid)]  # before its row was read (busy None now)
        monkeypatch.setattr(gateway.store, "busy_streams", lambda: listed)
        assert gateway.reap_abandoned() == []
        status = gateway.status(with_proofs("status", {"uid": uid}))
        assert (status["state"], status["alive"]) == ("RESERVED", True)
        assert not port_is_free(reply["listeners"][0])
        assert gateway.release(with_proofs("release", {"uid": uid}))["released"]
    assert port_is_free(reply["listeners"][0])


# -- a proxy killed mid-transfer ---------------------------------------------------------------
def _read_until_cut(address: str, outcome: list, received: threading.Event) -> threading.Thread:
    """A consumer app that only reads (as a stream's consumer does) until the end:
    ``received`` is set at its first bytes; ``outcome`` gets "eof" (a clean end) or the
    error (a reset)."""
    host, _, port = address.rpartition(":")

    def run() -> None:
        try:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                while sock.recv(1 << 20):
                    received.set()
            outcome.append("eof")
        except OSError as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _kill_mid_transfer(gateway_root, producer_app, prod_backend, cons_backend) -> list:
    """Kill the producer end's proxy while data flows; returns what the consumer app saw."""
    for name in {prod_backend, cons_backend} - {"native"}:
        if skip_reason(name):
            pytest.skip(skip_reason(name))
    producer = make_gateway(gateway_root, "prod", backend=prod_backend)
    consumer = make_gateway(gateway_root, "cons", backend=cons_backend)
    app = producer_app(1, 1 << 36)  # more than flows before the kill
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect(app.listeners)
        outcome: list = []
        received = threading.Event()
        reader = _read_until_cut(chain.cons["listeners"][0], outcome, received)
        assert received.wait(timeout=30), f"no data reached the app: {outcome}"
        pid = producer.call("status", {"uid": chain.uid})["pid"]
        identity = ProcessIdentity.of(pid)
        os.kill(pid, signal.SIGKILL)
        while identity.alive():
            time.sleep(0.01)
        status = producer.call("status", {"uid": chain.uid})
        reader.join(timeout=15)
        cut = list(outcome)
    finally:
        chain.release()
    assert status["state"] == "FAILED" and status["alive"] is False
    assert status["error_code"] == "CONN_ERROR" and status["last_error"]
    assert not chain.pair.leftovers()
    return cut


@pytest.mark.slow
@pytest.mark.parametrize("prod_backend", ["native", "stunnel", "haproxy"])
def test_a_producer_proxy_killed_mid_transfer_is_a_connection_error_for_the_app(
        gateway_root, producer_app, prod_backend):
    """The native consumer end sees its TLS hop end without close_notify (truncation)
    and resets the app: the app gets an error, never a clean end of a cut stream."""
    assert _kill_mid_transfer(gateway_root, producer_app, prod_backend, "native") == [
        "ConnectionResetError"]


@pytest.mark.slow
@pytest.mark.parametrize("cons_backend", ["stunnel", "haproxy", "nginx"])
def test_an_external_consumer_end_resets_the_app_when_the_producer_proxy_dies(
        gateway_root, producer_app, cons_backend):
    """The gateway's side holds as with a native consumer end (status, nothing left);
    only what the app sees is the known gap, and only a clean end counts as that."""
    cut = _kill_mid_transfer(gateway_root, producer_app, "native", cons_backend)
    if cut == ["eof"]:
        pytest.xfail("known gap: stunnel, HAProxy and nginx as the consumer end may pass a "
                     "truncated TLS hop on to a reading app as a clean EOF (docs/faults.md)")
    assert cut == ["ConnectionResetError"]


# -- restart ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_restart_reconciles_state_with_what_runs(gateway_root, echo):
    """Workers die (an endpoint restart) while streams run; meanwhile orphans appear:
    a stream directory, a process working in it, a relay stream and a port row of no
    stream. The next worker's first call removes each and keeps the live stream; later,
    with the relay killed during another restart, the stream turns FAILED and its
    resources are freed without a release."""
    producer = make_gateway(gateway_root, "prod")
    consumer = make_gateway(gateway_root, "cons")
    chain = LocalPair(producer, consumer).reserve(1)
    chain.connect([echo.address])
    state = consumer.settings.state_dir
    try:
        kill_workers(consumer)
        orphan = state / "streams" / str(uuid.uuid4())
        orphan.mkdir(mode=0o700)
        (orphan / "key.pem").write_text("left by a crash")
        squatter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                    cwd=orphan, start_new_session=True)
        ghost = state / "streams" / str(uuid.uuid4())  # in the relay, no row
        ghost.mkdir(mode=0o700)
        ghost_sock = socket.create_server(("127.0.0.1", 0))
        ghost_port = ghost_sock.getsockname()[1]
        NativeBackend().start(ProxySpec(uid=ghost.name, role="CONS", stream_dir=ghost,
                                        sockets=[ghost_sock]))
        ghost_sock.close()
        with sqlite3.connect(state / "state.sqlite3") as db:
            db.execute("INSERT INTO ports (port, uid) VALUES (?, ?)", (65000, ghost.name))
        assert sorted(NativeBackend.relay_streams(state)) == sorted([chain.uid, ghost.name])

        assert consumer.call("gateway_info", {})["free_ports"] == 39  # reconciled first
        assert squatter.wait(timeout=10) is not None
        assert not orphan.exists() and not ghost.exists()
        assert NativeBackend.relay_streams(state) == [chain.uid]
        assert port_is_free(f"127.0.0.1:{ghost_port}")
        log = (state / "gateway.log").read_text()
        assert "reconciled" in log and ghost.name in log and orphan.name in log
        status = consumer.call("status", {"uid": chain.uid})
        assert status["state"] == "CONNECTED" and status["alive"]
        assert roundtrip(chain.cons["listeners"][0]) == b"p" * 100_000

        kill_workers(consumer)
        relay = ProcessIdentity.of(status["pid"])
        os.kill(relay.pid, signal.SIGKILL)
        while relay.alive():
            time.sleep(0.01)
        status = consumer.call("status", {"uid": chain.uid})
        assert status["state"] == "FAILED" and status["error_code"] == "CONN_ERROR"
        assert "reconciled" in status["last_error"]
        assert not (state / "streams" / chain.uid).exists()  # freed without a release
        assert port_is_free(chain.cons["listeners"][0])
    finally:
        squatter.kill()
        chain.release()
    assert not chain.pair.leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["haproxy", "nginx"])
def test_a_restart_finds_a_dead_external_proxy_and_keeps_the_live_one(gateway_root, echo,
                                                                      backend):
    if skip_reason(backend):
        pytest.skip(skip_reason(backend))
    producer = make_gateway(gateway_root, "prod")
    consumer = make_gateway(gateway_root, "cons", backend=backend)
    pair = LocalPair(producer, consumer)
    dead, live = pair.reserve(1), pair.reserve(1)
    try:
        for chain in (dead, live):
            chain.connect([echo.address])
        pid = consumer.call("status", {"uid": dead.uid})["pid"]
        kill_workers(consumer)
        identity = ProcessIdentity.of(pid)
        os.kill(pid, signal.SIGKILL)  # nginx: the master; its worker lives on
        while identity.alive():
            time.sleep(0.01)
        status = consumer.call("status", {"uid": dead.uid})
        assert status["state"] == "FAILED" and "reconciled" in status["last_error"]
        assert not (consumer.settings.state_dir / "streams" / dead.uid).exists()
        # Nothing of it runs (nginx's orphaned worker included), its port is free.
        assert all(Path(cwd).name != dead.uid for cwd in
                   working_dirs(consumer.settings.state_dir / "streams").values())
        assert port_is_free(dead.cons["listeners"][0])
        assert consumer.call("status", {"uid": live.uid})["alive"]
        assert roundtrip(live.cons["listeners"][0]) == b"p" * 100_000
    finally:
        dead.release()
        live.release()
    assert not live.pair.leftovers()


# -- the peer -------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_unreachable_peer_shows_on_the_data_path_and_leaks_nothing(gateways, echo):
    """connect does not probe the peer (it may come up later, and a probe would be one
    more connection to account for); the consumer's relay reports each refused
    connection in status, and the app's connection is cut."""
    producer, consumer = gateways
    chain = LocalPair(producer, consumer).reserve(1)
    closed = socket.create_server(("127.0.0.1", 0))
    dead_end = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    try:
        producer.call("hello", {"uid": chain.uid, "key": chain.key, "role": "PROD",
                                "app_listeners": [echo.address]})
        reply = consumer.call("connect", {
            "uid": chain.uid, "remote_listeners": [dead_end],
            "peer_certificate": chain.prod["certificate"],
            "peer_fingerprint": chain.prod["cert_fingerprint"]})
        assert reply["state"] == "CONNECTED"
        assert roundtrip(chain.cons["listeners"][0]) in ("eof", "ConnectionResetError")
        status = consumer.call("status", {"uid": chain.uid})
        assert status["connections"]["failed"] >= 1
        assert status["error_code"] == "CONN_ERROR"
        assert "refused" in status["last_error"].lower()
        assert status["state"] == "CONNECTED" and status["alive"]
    finally:
        chain.release()
    assert not chain.pair.leftovers()


@pytest.mark.slow
def test_a_peer_with_another_certificate_is_refused_on_the_data_path(gateways, echo,
                                                                     tmp_path):
    producer, consumer = gateways
    chain = LocalPair(producer, consumer).reserve(1)
    try:
        chain.connect([echo.address], cons_peer=impostor(tmp_path))
        assert roundtrip(chain.cons["listeners"][0]) in ("eof", "ConnectionResetError")
        status = consumer.call("status", {"uid": chain.uid})
        assert status["connections"]["failed"] >= 1
        assert "certificate" in status["last_error"].lower()
        assert status["connections"]["total"] == status["connections"]["failed"]
    finally:
        chain.release()
    assert not chain.pair.leftovers()


# -- hello ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hello_with_another_streams_key_a_replay_and_other_listeners(gateways, echo):
    producer, consumer = gateways
    pair = LocalPair(producer, consumer)
    first, second = pair.reserve(1), pair.reserve(1)
    try:
        hello = {"uid": first.uid, "key": first.key, "role": "PROD",
                 "app_listeners": [echo.address]}
        # Another stream's key (the replay of a hello of `second` onto `first`).
        with pytest.raises(AuthError, match="wrong hello key"):
            producer.call("hello", {**hello, "key": second.key})
        assert producer.call("status", {"uid": first.uid})["state"] == "RESERVED"
        assert producer.call("hello", hello)["listeners"] == first.prod["listeners"]
        # The same hello again (a retry, or a replay) changes nothing and succeeds.
        assert producer.call("hello", hello)["listeners"] == first.prod["listeners"]
        # The right key with other listeners is refused: the first hello holds.
        with pytest.raises(BadFormat, match="already has app_listeners"):
            producer.call("hello", {**hello, "app_listeners": ["127.0.0.1:9"]})
        # A replay of the first stream's hello onto the second is refused too.
        with pytest.raises(AuthError):
            producer.call("hello", {**hello, "uid": second.uid})
        assert producer.call("wait_hello", {"uid": first.uid, "timeout_s": 0})[
            "app_listeners"] == [echo.address]
        assert producer.call("status", {"uid": second.uid})["state"] == "RESERVED"
    finally:
        first.release()
        second.release()


# -- the state database ------------------------------------------------------------------------
def test_a_version_1_state_database_is_migrated_and_keeps_its_streams(tmp_path):
    from scistream_gateway import store

    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(store._MIGRATIONS[1] + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO streams (uid, role, state, num_conn, rate, lease_expires, "
               "listeners, cert_fingerprint, certificate, backend, created, updated) VALUES "
               "('u1', 'PROD', 'RESERVED', 1, 0, 1e12, '[\"127.0.0.1:1\"]', 'f', 'c', "
               "'native', 0, 0)")
    db.close()
    migrated = Store(path)
    try:
        assert migrated.version() == SCHEMA_VERSION == 3
        row = migrated.get("u1")
        assert row.state == "RESERVED" and row.busy is None
        assert row.control_sha256 is None and row.owner_sha256 is None  # the operator's
        with migrated.transaction():
            migrated.update("u1", busy={"pid": 1, "start_time": 2, "op": "connect"})
        assert migrated.get("u1").busy["op"] == "connect"
    finally:
        migrated.close()
    again = Store(path)  # opening a current database changes nothing
    assert again.version() == 3 and again.get("u1").busy["pid"] == 1
    again.close()


def test_a_backend_that_cannot_start_now_is_unavailable_and_leaves_nothing(gateway_root,
                                                                           monkeypatch):
    """What a backend needs is away at reserve (its container engine, say): UNAVAILABLE,
    a request worth retrying, with the STARTING row, its ports and its files gone."""
    from scistream_proxy.backends import ProxyUnavailable

    def engine_away(self, spec):
        raise ProxyUnavailable("no engine answers (injected)")

    gw = make_gateway(gateway_root, "away-gw", size=4)
    monkeypatch.setattr(NativeBackend, "start", engine_away)
    uid = str(uuid.uuid4())
    with Gateway(gw.settings) as gateway:
        with pytest.raises(Unavailable, match="cannot start now: no engine answers"):
            gateway.reserve(with_proofs("reserve", _request(uid, "CONS", num_conn=4)))
        assert gateway.store.get(uid) is None and gateway.store.used_ports() == set()
    assert list((gw.settings.state_dir / "streams").iterdir()) == []
    assert all(port_is_free(f"127.0.0.1:{p}") for p in range(gw.settings.port_min,
                                                            gw.settings.port_max + 1))
