"""Every gateway function through globus-compute-endpoint's own ProcessPoolEngine, with the
SDK's serializer and the shipped deserializer allow-list, as an endpoint runs them; and
what outlives the engine: proxies (worker and engine killed) and state (a restart)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import time
import uuid

import pytest

from scistream_proxy.native_backend import NativeBackend
from scistream_proxy.leaks import port_is_free
from scistream_proxy.process import ProcessIdentity

from conftest import make_gateway
from gatewaykit import engine_for


def _reserve(engine, role="PROD", num_conn=2, uid=None, key="hello-key", **extra):
    uid = uid or str(uuid.uuid4())
    reply = engine.call("reserve", {"uid": uid, "role": role, "num_conn": num_conn,
                                    "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                                    **extra})
    assert "error" not in reply, reply
    return uid, key, reply


@pytest.mark.slow
def test_every_function_runs_on_the_endpoint_engine(gateway_root, producer_app):
    """A whole stream, every function, each call an endpoint task."""
    import subprocess

    from scistream_proxy import apps

    prod_gw = make_gateway(gateway_root, "prod-ep")
    cons_gw = make_gateway(gateway_root, "cons-ep")
    app = producer_app(2, 256 * 1024)
    with engine_for(prod_gw.settings_path) as prod, engine_for(cons_gw.settings_path) as cons:
        info = prod.call("gateway_info", {})
        assert info["name"] == "prod-ep" and info["free_ports"] == 40
        uid, key, p = _reserve(prod)
        _, _, c = _reserve(cons, role="CONS", uid=uid, key=key)
        try:
            assert prod.call("hello", {"uid": uid, "key": key, "role": "PROD",
                                       "app_listeners": app.listeners})["uid"] == uid
            waited = prod.call("wait_hello", {"uid": uid, "timeout_s": 1})
            assert waited["state"] == "HELLO" and waited["app_listeners"] == app.listeners
            for engine, peer in ((prod, c), (cons, p)):
                reply = engine.call("connect", {
                    "uid": uid, "remote_listeners": peer["listeners"],
                    "peer_fingerprint": peer["cert_fingerprint"],
                    "peer_certificate": peer["certificate"]})
                assert reply["state"] == "CONNECTED", reply
            done = subprocess.run([*apps.COMMAND, "consumer", *c["listeners"], "--timeout", "30"],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            received = apps.connection_results(done.stdout)
            sent = app.result()
            assert len(received) == 2
            assert sorted((r["bytes"], r["sha256"]) for r in received) == sorted(
                (r["bytes"], r["sha256"]) for r in sent)
            status = prod.call("status", {"uid": uid})
            assert status["alive"] and status["bytes"]["to_app"] == 0
            assert status["bytes"]["from_app"] == sum(r["bytes"] for r in sent) == 256 * 1024
            renewed = prod.call("renew", {"uid": uid, "lease_s": 120})
            assert renewed["lease_expires"] > time.time() + 100
            listed = prod.call("list_streams", {})["streams"]
            assert [(s["uid"], s["state"]) for s in listed] == [(uid, "CONNECTED")]
        finally:
            assert prod.call("release", {"uid": uid}) == {"uid": uid, "released": True}
            assert cons.call("release", {"uid": uid}) == {"uid": uid, "released": True}
        assert all(port_is_free(a) for a in p["listeners"] + c["listeners"])


def test_expected_failures_come_back_as_error_replies_not_task_failures(gateway_root):
    gw = make_gateway(gateway_root, "errors-ep")
    with engine_for(gw.settings_path) as engine:
        cases = [
            ("reserve", ["not", "an", "object"], "BAD_FORMAT"),
            ("status", {"uid": str(uuid.uuid4())}, "INVALID_UID"),
            ("reserve", {"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": 65,
                         "key_sha256": "0" * 64}, "NO_RESOURCE"),
            ("hello", {"uid": str(uuid.uuid4()), "key": "k", "role": "PROD"}, "INVALID_UID"),
        ]
        for function, request, code in cases:
            error = engine.call(function, request)["error"]
            assert error["code"] == code, error
            if function == "reserve" and code == "NO_RESOURCE":
                assert "max_num_conn" in error["message"]


def test_the_endpoint_refuses_pickled_arguments(gateway_root):
    """The shipped allow-list (source text + JSON) is enforced by the engine: a task
    whose arguments are pickled never reaches a gateway function."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Task
    from globus_compute_endpoint.engines.base import GCFuture
    from globus_compute_sdk.serialize import ComputeSerializer, DillCodeSource, DillDataBase64

    gw = make_gateway(gateway_root, "pickle-ep")
    with engine_for(gw.settings_path) as engine:
        pickling = ComputeSerializer(strategy_code=DillCodeSource(),
                                     strategy_data=DillDataBase64())
        args = pickling.pack_buffers([pickling.serialize(({},)), pickling.serialize({})])
        task = messagepack.pack(Task(task_id=uuid.uuid4(),
                                     task_buffer=engine.function_code("gateway_info") + args))
        future = GCFuture(gc_task_id=uuid.uuid4())
        engine.engine.submit(future, task, resource_specification={})
        with pytest.raises(RuntimeError, match="DillDataBase64"):
            engine.result(future)


@pytest.mark.slow
def test_proxies_survive_the_worker_and_the_engine_that_started_them(gateway_root):
    gw = make_gateway(gateway_root, "survive-ep")
    engine = engine_for(gw.settings_path, max_workers=1).__enter__()
    try:
        uid, _, reply = _reserve(engine)
        pid = engine.call("status", {"uid": uid})["pid"]
        workers = engine.worker_pids()
        assert workers and pid not in workers
        for worker in workers:  # the worker dies hard, as in an OOM kill
            os.kill(worker, signal.SIGKILL)
    finally:
        engine.close()  # the endpoint engine goes away too
    identity = ProcessIdentity.of(pid)
    deadline = time.monotonic() + 10
    while any(ProcessIdentity.of(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert identity is not None and identity.alive()
    assert not any(port_is_free(a) for a in reply["listeners"])  # still held by the proxy
    # A new engine (the restarted endpoint) finds the stream and its proxy.
    with engine_for(gw.settings_path) as again:
        status = again.call("status", {"uid": uid})
        assert status["state"] == "RESERVED" and status["alive"] and status["pid"] == pid
        assert again.call("release", {"uid": uid})["released"]
    assert not identity.alive()


@pytest.mark.slow
def test_restart_keeps_state_and_reports_a_dead_proxy_without_touching_a_reused_pid(
        gateway_root):
    """State survives the gateway's restart; a proxy recorded as running is checked by
    pid and start time: gone is FAILED; a pid now held by another process is never
    signalled."""
    import subprocess
    import sys

    gw = make_gateway(gateway_root, "restart-ep")
    db = gw.settings.state_dir / "state.sqlite3"
    with engine_for(gw.settings_path) as engine:
        gone, _, gone_reply = _reserve(engine)
        reused, _, _ = _reserve(engine)
        gone_pid = engine.call("status", {"uid": gone})["pid"]
        reused_pid = engine.call("status", {"uid": reused})["pid"]
        real = ProcessIdentity.of(reused_pid)
        # The native relay hosts both: it dies, and a later reserve starts another.
        os.kill(gone_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while real.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        alive, _, _ = _reserve(engine)

    # While the gateway is down: one record is pointed at an unrelated process (as if
    # the pid of its dead proxy had been reused).
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        if reused_pid != gone_pid:  # a backend with a process per stream end
            os.kill(reused_pid, signal.SIGKILL)
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE streams SET proxy = ? WHERE uid = ?",
                         (f'{{"pid": {bystander.pid}, "start_time": {real.start_time}}}', reused))
        deadline = time.monotonic() + 5
        while ProcessIdentity.of(gone_pid) and time.monotonic() < deadline:
            time.sleep(0.02)

        with engine_for(gw.settings_path) as engine:  # the restarted gateway
            info = engine.call("gateway_info", {})
            assert info["active_streams"] == 3
            assert engine.call("status", {"uid": alive})["alive"] is True
            for uid in (gone, reused):
                status = engine.call("status", {"uid": uid})
                assert status["state"] == "FAILED" and status["alive"] is False, status
            for uid in (gone, reused, alive):
                assert engine.call("release", {"uid": uid})["released"]
            assert engine.call("gateway_info", {})["free_ports"] == 40
        assert bystander.poll() is None  # never signalled
        assert all(port_is_free(a) for a in gone_reply["listeners"])
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_lease_expiry_is_reaped_by_any_later_call(gateway_root):
    gw = make_gateway(gateway_root, "lease-ep")
    with engine_for(gw.settings_path) as engine:
        uid, _, reply = _reserve(engine, lease_s=1)
        keep, _, _ = _reserve(engine, lease_s=600)
        pid = engine.call("status", {"uid": uid})["pid"]
        identity = ProcessIdentity.of(pid)
        time.sleep(1.1)
        # Any function reaps, even one about another stream.
        assert engine.call("renew", {"uid": keep, "lease_s": 600})["uid"] == keep
        # The gateway's one native relay runs on for `keep`, without the expired stream.
        assert identity.alive() and engine.call("status", {"uid": keep})["pid"] == pid
        assert NativeBackend.relay_streams(gw.settings.state_dir) == [keep]
        assert all(port_is_free(a) for a in reply["listeners"])
        assert not (gw.settings.state_dir / "streams" / uid).exists()
        assert engine.call("status", {"uid": uid})["state"] == "EXPIRED"
        assert engine.call("renew", {"uid": uid})["error"]["code"] == "INVALID_UID"
        engine.call("release", {"uid": keep})


@pytest.mark.slow
def test_connect_to_a_dead_proxy_is_conn_error_and_the_failure_is_kept(gateway_root):
    gw = make_gateway(gateway_root, "dead-ep", allow_plain_tcp=True)
    with engine_for(gw.settings_path) as engine:
        uid, _, reply = _reserve(engine, role="CONS")
        os.kill(engine.call("status", {"uid": uid})["pid"], signal.SIGKILL)
        with sqlite3.connect(gw.settings.state_dir / "state.sqlite3") as db:
            proxy = db.execute("SELECT proxy FROM streams WHERE uid = ?", (uid,)).fetchone()
        identity = ProcessIdentity(**json.loads(proxy[0]))
        deadline = time.monotonic() + 5
        while identity.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = engine.call("connect", {"uid": uid, "remote_listeners": ["127.0.0.1:9"],
                                          "tls": False})
        assert refused["error"]["code"] == "CONN_ERROR"
        with sqlite3.connect(gw.settings.state_dir / "state.sqlite3") as db:
            state = db.execute("SELECT state FROM streams WHERE uid = ?", (uid,)).fetchone()
        assert state == ("FAILED",)  # recorded, not rolled back with the error
        assert not (gw.settings.state_dir / "streams" / uid / "peer.pem").exists()
        assert engine.call("release", {"uid": uid})["released"]
        assert all(port_is_free(a) for a in reply["listeners"])


def test_info_command_runs_gateway_info_on_the_engine(gateway_root, capsys):
    from scistream_gateway.cli import main

    gw = make_gateway(gateway_root, "info-ep")
    assert main(["info", "--settings", str(gw.settings_path), "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["name"] == "info-ep" and reply["free_ports"] == 40
    assert main(["info", "--settings", str(gw.settings_path)]) == 0
    text = capsys.readouterr().out
    assert "gateway info-ep" in text and "40 free; 0 active streams" in text
    assert "proxies launched:" in text
    broken = gateway_root / "broken.toml"
    broken.write_text("[gateway]\nname = 'x'\n")
    assert main(["info", "--settings", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("scistream-gateway info: SERVER_ERR: gateway settings")
