"""Gateway functions through the LocalGateway seam (Globus Compute serializer, worker
processes, SQLite state, real proxies): the wire contract and its error codes."""

from __future__ import annotations

import os
import secrets
import stat
import time
import uuid
from contextlib import contextmanager

import pytest

from scistream_prefect import (
    AuthError,
    BadFormat,
    InvalidUid,
    NoResource,
    NotImplementedHere,
    ServerError,
)
from scistream_proxy.process import ProcessIdentity

from conftest import make_gateway
from gatewaykit import reserve
from recordkit import run_records
from scistream_proxy.leaks import port_is_free


@contextmanager
def reserved(gw, **kwargs):
    """A reservation released afterwards, whatever the test did."""
    uid, key, reply = reserve(gw, **kwargs)
    try:
        yield uid, key, reply
    finally:
        gw.call("release", {"uid": uid})


def test_gateway_info_describes_the_gateway(gateways):
    producer, _ = gateways
    info = producer.call("gateway_info", {})
    assert info["name"] == "prod-gw"
    assert info["backends"]["native"]["available"] is True
    assert info["free_ports"] == 40 and info["active_streams"] == 0


def test_reserve_binds_ports_and_stores_only_the_key_hash(gateways):
    producer, _ = gateways
    with reserved(producer, num_conn=3) as (uid, key, reply):
        assert len(reply["listeners"]) == 3
        assert len(reply["cert_fingerprint"]) == 64
        # The kernel holds the ports from reserve on, before any connect.
        assert not any(port_is_free(a) for a in reply["listeners"])
        state_dir = producer.settings.state_dir
        db = (state_dir / "state.sqlite3").read_bytes()
        assert key.encode() not in db
        stream_dir = state_dir / "streams" / uid
        assert stat.S_IMODE(stream_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((stream_dir / "key.pem").stat().st_mode) == 0o600
        assert producer.call("gateway_info", {})["free_ports"] == 37


def test_reserve_is_idempotent_and_refuses_a_conflicting_repeat(gateways):
    producer, _ = gateways
    with reserved(producer) as (uid, key, first):
        _, _, again = reserve(producer, uid=uid, key=key)
        assert again == first
        with pytest.raises(BadFormat, match="other parameters"):
            reserve(producer, uid=uid, key=key, num_conn=3)
        assert producer.call("gateway_info", {})["active_streams"] == 1
    with pytest.raises(BadFormat, match="needs a new uid"):
        reserve(producer, uid=uid, key=key)


def test_wrong_hello_key_is_auth_error_and_changes_nothing(gateways):
    producer, _ = gateways
    with reserved(producer) as (uid, key, _):
        with pytest.raises(AuthError):
            producer.call("hello", {"uid": uid, "key": "not-the-key", "role": "PROD",
                                    "app_listeners": ["127.0.0.1:9"]})
        status = producer.call("status", {"uid": uid})
        assert status["state"] == "RESERVED" and status["alive"] is True
        waited = producer.call("wait_hello", {"uid": uid, "timeout_s": 0})
        assert waited == {"uid": uid, "state": "RESERVED", "app_listeners": []}
        # The right key still works afterwards.
        reply = producer.call("hello", {"uid": uid, "key": key, "role": "PROD",
                                        "app_listeners": ["127.0.0.1:9"]})
        assert reply["uid"] == uid
        assert producer.call("wait_hello", {"uid": uid})["app_listeners"] == ["127.0.0.1:9"]


def test_wait_hello_is_a_bounded_long_poll(gateways):
    producer, _ = gateways
    with reserved(producer) as (uid, _, _):
        started = time.monotonic()
        reply = producer.call("wait_hello", {"uid": uid, "timeout_s": 0.5})
        waited = time.monotonic() - started
        assert reply["state"] == "RESERVED"
        # It waits for the time asked, not its default (10 s) nor its longest (20 s).
        assert 0.5 <= waited < 4, waited
        with pytest.raises(BadFormat):
            producer.call("wait_hello", {"uid": uid, "timeout_s": 3600})


def test_release_stops_proxy_frees_ports_deletes_keys_and_is_idempotent(gateways):
    producer, _ = gateways
    uid, _, reply = reserve(producer, num_conn=2)
    pid = producer.call("status", {"uid": uid})["pid"]
    identity = ProcessIdentity.of(pid)
    assert identity is not None and identity.alive()
    stream_dir = producer.settings.state_dir / "streams" / uid

    assert producer.call("release", {"uid": uid}) == {"uid": uid, "released": True}
    assert not identity.alive()
    assert all(port_is_free(a) for a in reply["listeners"])
    assert not stream_dir.exists()
    status = producer.call("status", {"uid": uid})
    assert status["state"] == "RELEASED" and status["alive"] is False
    assert producer.call("gateway_info", {})["free_ports"] == 40
    # Twice, and for a uid the gateway never saw.
    assert producer.call("release", {"uid": uid})["released"] is True
    assert producer.call("release", {"uid": str(uuid.uuid4())})["released"] is True
    # Released ports are handed out again.
    uid2, _, again = reserve(producer, num_conn=2)
    assert set(again["listeners"]) == set(reply["listeners"])
    producer.call("release", {"uid": uid2})


def test_port_range_exhaustion_is_no_resource_and_leaks_nothing(gateway_root):
    small = make_gateway(gateway_root, "small-gw", size=3)
    with reserved(small, num_conn=2) as (uid, _, _):
        with pytest.raises(NoResource, match="exhausted: 1 free, num_conn=2"):
            reserve(small, num_conn=2)
        info = small.call("gateway_info", {})
        assert info["active_streams"] == 1 and info["free_ports"] == 1


def test_a_port_held_by_another_process_is_skipped(gateway_root):
    import socket

    small = make_gateway(gateway_root, "busy-gw", size=3)
    low = small.settings.port_min
    with socket.create_server(("127.0.0.1", low)):
        uid, _, reply = reserve(small, num_conn=2)
        small.call("release", {"uid": uid})
    assert f"127.0.0.1:{low}" not in reply["listeners"]


def test_rate_capacity_is_enforced(gateway_root):
    gw = make_gateway(gateway_root, "rated-gw", rate_capacity=10_000)
    with reserved(gw, rate=8_000) as (uid, _, _):
        with pytest.raises(NoResource, match="rate capacity"):
            reserve(gw, rate=4_000)
        with pytest.raises(NoResource, match="ask for a rate"):
            reserve(gw, rate=0)


def test_connect_checks_order_and_pinning_input(gateways):
    producer, consumer = gateways
    uid, key, prod = reserve(producer)
    _, _, cons = reserve(consumer, role="CONS", uid=uid, key=key)
    try:
        request = {"uid": uid, "remote_listeners": cons["listeners"],
                   "peer_fingerprint": cons["cert_fingerprint"],
                   "peer_certificate": cons["certificate"]}
        with pytest.raises(InvalidUid, match="hello"):
            producer.call("connect", request)
        # A certificate that is not the pinned one is refused before any proxy sees it.
        wrong = dict(request, peer_certificate=prod["certificate"])
        with pytest.raises(AuthError, match="does not match"):
            consumer.call("connect", dict(wrong, remote_listeners=prod["listeners"]))
        with pytest.raises(BadFormat, match="tls: false"):
            consumer.call("connect", {"uid": uid, "remote_listeners": prod["listeners"]})
        assert consumer.call("status", {"uid": uid})["state"] == "RESERVED"
    finally:
        producer.call("release", {"uid": uid})
        consumer.call("release", {"uid": uid})


def test_renew_extends_the_lease(gateways):
    producer, _ = gateways
    with reserved(producer, lease_s=60) as (uid, _, reply):
        renewed = producer.call("renew", {"uid": uid, "lease_s": 600})
        assert renewed["lease_expires"] > reply["lease_expires"] + 500
    with pytest.raises(InvalidUid):
        producer.call("renew", {"uid": uid})


def test_expired_lease_is_reaped_by_the_next_call(gateways):
    producer, _ = gateways
    uid, _, reply = reserve(producer, lease_s=1)
    identity = ProcessIdentity.of(producer.call("status", {"uid": uid})["pid"])
    time.sleep(1.2)
    assert producer.call("gateway_info", {})["active_streams"] == 0
    assert producer.call("status", {"uid": uid})["state"] == "EXPIRED"
    assert not identity.alive()
    assert all(port_is_free(a) for a in reply["listeners"])
    assert not (producer.settings.state_dir / "streams" / uid).exists()


def test_a_dead_proxy_is_reported_and_release_cleans_up(gateways):
    producer, _ = gateways
    uid, _, reply = reserve(producer)
    pid = producer.call("status", {"uid": uid})["pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while ProcessIdentity.of(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    status = producer.call("status", {"uid": uid})
    assert status["state"] == "FAILED" and status["alive"] is False
    assert producer.call("release", {"uid": uid})["released"] is True
    assert all(port_is_free(a) for a in reply["listeners"])


@pytest.mark.parametrize("request_, error", [
    ({"uid": "not-a-uuid", "role": "PROD", "num_conn": 1, "key_sha256": "0" * 64}, BadFormat),
    ({"uid": str(uuid.uuid4()).upper(), "role": "PROD", "num_conn": 1, "key_sha256": "0" * 64},
     BadFormat),
    ({"uid": str(uuid.uuid4()), "role": "BOTH", "num_conn": 1, "key_sha256": "0" * 64}, BadFormat),
    ({"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": 0, "key_sha256": "0" * 64}, BadFormat),
    # Over the gateway's max_num_conn is a refusal for lack of resources, not bad input.
    ({"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": 65, "key_sha256": "0" * 64},
     NoResource),
    ({"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": 70000, "key_sha256": "0" * 64},
     BadFormat),
    ({"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": True, "key_sha256": "0" * 64},
     BadFormat),
    ({"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": 1, "key_sha256": "xyz"}, BadFormat),
    ({"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": 1, "key_sha256": "0" * 64,
      "listen_on": "0.0.0.0"}, BadFormat),
    ({"uid": str(uuid.uuid4()), "role": "PROD", "num_conn": 1}, BadFormat),
    (["not", "an", "object"], BadFormat),
])
def test_malformed_reserve_is_bad_format_and_changes_nothing(gateways, request_, error):
    producer, _ = gateways
    with pytest.raises(error):
        producer.call("reserve", request_)
    info = producer.call("gateway_info", {})
    assert info["active_streams"] == 0 and info["free_ports"] == 40
    assert list((producer.settings.state_dir / "streams").iterdir()) == []


@pytest.mark.parametrize("listener", [
    "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1", "evil\nhost:80", "host name:80",
    "[127.0.0.1]:80", "::1:80", "a" * 300 + ":80", 42,
])
def test_hello_refuses_addresses_that_could_reach_a_config(gateways, listener):
    producer, _ = gateways
    with reserved(producer) as (uid, key, _):
        with pytest.raises(BadFormat):
            producer.call("hello", {"uid": uid, "key": key, "role": "PROD",
                                    "app_listeners": [listener]})
        assert producer.call("status", {"uid": uid})["state"] == "RESERVED"


def test_unknown_uid_and_unknown_function(gateways):
    producer, _ = gateways
    with pytest.raises(InvalidUid):
        producer.call("status", {"uid": str(uuid.uuid4())})
    from scistream_gateway.wire import handle

    assert handle("format_disk", {})["error"]["code"] == NotImplementedHere.code


def test_broken_settings_are_a_server_error_naming_the_file(tmp_path, monkeypatch):
    from scistream_gateway.functions import gateway_info

    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nname = "x"\nstate_dir = "/tmp/x"\nport_range = [80, 70]\n')
    monkeypatch.setenv("SCISTREAM_GATEWAY_CONFIG", str(path))
    reply = gateway_info({})
    assert reply["error"]["code"] == ServerError.code
    assert str(path) in reply["error"]["message"] and "port_range" in reply["error"]["message"]


@pytest.mark.slow
def test_hello_key_is_never_written_or_recorded(gateways, producer_app):
    """The key reaches a gateway only in hello: not in gateway files, not in the handle,
    not in Prefect's records of the open and release runs (flow runs, task runs, every
    log line of either). Each run is named by a marker that its own log must show, so a
    search that reads nothing fails. Nor do the proofs of ownership (the stream's
    control secret, the owner token), which only Gateway.call adds to a request."""
    from prefect.blocks.system import Secret

    from scistream_prefect import open_stream, release_stream
    from scistream_prefect.ownership import control_secret, owner_token

    producer, consumer = gateways
    app = producer_app(1, 1024)
    key = secrets.token_urlsafe(32)
    Secret(value=key).save("test-hello-key", overwrite=True)
    markers = [f"open-{uuid.uuid4()}", f"release-{uuid.uuid4()}"]
    opened = open_stream.with_options(flow_run_name=markers[0])(
        producer, consumer, num_conn=1, app_listeners=app.listeners, uid=str(uuid.uuid4()),
        hello_key_block="test-hello-key", return_state=True)
    handle = opened.result()
    secrets_ = [key, control_secret(handle.uid), owner_token()]
    try:
        for gw in (producer, consumer):
            for path in gw.settings.state_dir.rglob("*"):
                if path.is_file():
                    data = path.read_bytes()
                    assert not any(s.encode() in data for s in secrets_), path
    finally:
        released = release_stream.with_options(flow_run_name=markers[1])(
            producer, consumer, handle.uid, return_state=True)
    assert released.is_completed()
    assert not any(s in repr(handle) or s in handle.model_dump_json() for s in secrets_)
    records = run_records(opened.state_details.flow_run_id, released.state_details.flow_run_id,
                          expect=[f"Beginning flow run {marker!r}" for marker in markers])
    lines = "\n".join(records.messages())
    assert all(f"Beginning flow run {marker!r}" in lines for marker in markers), lines
    assert any(log.task_run_id for log in records.logs)  # the task runs' lines too
    assert records.flow_runs[0].parameters["hello_key_block"] == "test-hello-key"
    leaked = [text for text in records.texts() if any(s in text for s in secrets_)]
    assert not leaked, leaked[0][:2000] if leaked else ""


@pytest.mark.slow
def test_concurrent_reserves_never_share_a_port(gateway_root):
    from concurrent.futures import ThreadPoolExecutor

    from scistream_prefect import LocalGateway

    gw = make_gateway(gateway_root, "busy-gw")
    busy = LocalGateway(settings_path=gw.settings_path, workers=4)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: reserve(busy, num_conn=4), range(8)))
    try:
        ports = [a for _, _, r in replies for a in r["listeners"]]
        assert len(ports) == len(set(ports)) == 32
        info = busy.call("gateway_info", {})
        assert info["active_streams"] == 8 and info["free_ports"] == 8
    finally:
        for uid, _, _ in replies:
            busy.call("release", {"uid": uid})
