"""Setup in two round trips (issue 18): the producer's hello rides on its connect, so a
flow given the app listeners opens a stream with reserve ‖ reserve -> connect ‖ connect.
Real local gateways, relays and SQLite; every refusal leaves the state as it was."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from scistream_gateway.errors import AuthError, BadFormat, InvalidUid, SciStreamError
from scistream_prefect import LocalPair
from scistream_prefect import streams_core as core

from badinputkit import dump_state
from conftest import run_consumer
from gatewaykit import reserve

MiB = 2**20
KEY = "k" * 43


class Seam:
    """A gateway whose calls are recorded (start, end, function): the client's seam."""

    def __init__(self, gateway):
        self.gateway, self.label, self.calls = gateway, gateway.label, []
        self.lock = threading.Lock()

    def call(self, function, request, timeout_s=None):
        started = time.perf_counter()
        try:
            return self.gateway.call(function, request, timeout_s)
        finally:
            with self.lock:
                self.calls.append((started, time.perf_counter(), function))


def waves(*seams: Seam) -> list[list[str]]:
    """The calls of ``seams`` as sequential round trips (overlapping calls are one)."""
    groups, end = [], None
    for start, stop, function in sorted(c for s in seams for c in s.calls):
        if end is not None and start < end:
            groups[-1].append(function)
            end = max(end, stop)
        else:
            groups.append([function])
            end = stop
    return [sorted(g) for g in groups]


def _peer(reply: dict) -> dict:
    return {"peer_certificate": reply["certificate"],
            "peer_fingerprint": reply["cert_fingerprint"]}


def test_an_open_with_app_listeners_is_two_round_trips_and_carries_data(gateways,
                                                                          producer_app):
    producer, consumer = Seam(gateways[0]), Seam(gateways[1])
    app = producer_app(2, 4 * MiB)
    uid, key = core.key_and_uid(None, None, app.listeners)
    handle = core.open_ends(producer, consumer, uid=uid, hello_key=key, num_conn=2,
                            app_listeners=app.listeners)
    try:
        assert waves(producer, consumer) == [["reserve", "reserve"], ["connect", "connect"]]
        assert handle.setup_round_trips == 2 and handle.app_listeners == app.listeners
        assert producer.gateway.call("status", {"uid": uid})["state"] == "CONNECTED"
        code, received = run_consumer(handle.listeners)
        sent = app.result()
        assert code == 0, received
        assert sorted(r["sha256"] for r in received) == sorted(r["sha256"] for r in sent)
        assert sum(r["bytes"] for r in received) == 4 * MiB
    finally:
        core.release_both(producer, consumer, uid)


def test_a_controller_that_says_hello_itself_keeps_the_three_round_trips(gateways):
    producer, consumer = Seam(gateways[0]), Seam(gateways[1])
    uid, key = core.key_and_uid(str(uuid.uuid4()), "the controller's key", None)

    class ControllerSteps(core.Steps):
        """After the reserves, the producer's controller says hello on its own."""

        def both(self, step, first, second):
            replies = super().both(step, first, second)
            if step is core.reserve:
                threading.Thread(target=core.hello, args=(
                    gateways[0], uid, key, "PROD", ["127.0.0.1:9"])).start()
            return replies

    handle = core.open_ends(producer, consumer, uid=uid, hello_key=key, num_conn=1,
                            hello_timeout_s=30, steps=ControllerSteps())
    try:
        assert handle.setup_round_trips == 3 and handle.app_listeners == ["127.0.0.1:9"]
        assert waves(producer, consumer) == [["reserve", "reserve"], ["wait_hello"],
                                             ["connect", "connect"]]
    finally:
        core.release_both(producer, consumer, uid)


def _refused(gateway, function: str, request: dict) -> SciStreamError:
    """Call ``function``; it must be refused and change nothing of ``gateway``'s state."""
    before = dump_state(gateway.settings.state_dir)
    with pytest.raises(SciStreamError) as refused:
        gateway.call(function, request)
    assert dump_state(gateway.settings.state_dir) == before, refused.value
    return refused.value


def test_a_folded_hello_is_checked_as_hello_checks_it(gateways):
    producer, consumer = gateways
    uid, _, prod = reserve(producer, "PROD", num_conn=2, key=KEY)
    _, _, cons = reserve(consumer, "CONS", num_conn=2, key=KEY, uid=uid)
    connect = {"uid": uid, "remote_listeners": cons["listeners"], **_peer(cons)}
    for hello, error in [
        ({"key": "wrong", "app_listeners": ["127.0.0.1:9"]}, AuthError),
        ({"key": KEY, "app_listeners": ["127.0.0.1:9"] * 3}, BadFormat),  # > num_conn
        ({"key": KEY, "app_listeners": ["::1:9"]}, BadFormat),
        ({"key": KEY, "app_listeners": []}, BadFormat),
        ({"key": KEY}, BadFormat),
        ({"key": "", "app_listeners": ["127.0.0.1:9"]}, BadFormat),
        ({"key": KEY, "app_listeners": ["127.0.0.1:9"], "role": "PROD"}, BadFormat),
        ("not an object", BadFormat),
    ]:
        assert isinstance(_refused(producer, "connect", {**connect, "hello": hello}), error)
    # The control secret is proven first: the hello key alone controls nothing.
    refused = _refused(producer, "connect", {**connect, "control": "guessed",
                                             "hello": {"key": KEY,
                                                       "app_listeners": ["127.0.0.1:9"]}})
    assert isinstance(refused, AuthError) and "control secret" in refused.message
    # Without any hello, a producer's connect still comes too early.
    assert isinstance(_refused(producer, "connect", connect), InvalidUid)
    # A hello folded into the consumer's connect: the consumer gives no app listeners.
    folded = {"key": KEY, "app_listeners": ["127.0.0.1:9"]}
    refused = _refused(consumer, "connect", {"uid": uid, "remote_listeners": prod["listeners"],
                                             **_peer(prod), "hello": folded})
    assert isinstance(refused, BadFormat) and "CONS" in refused.message
    assert producer.call("status", {"uid": uid})["state"] == "RESERVED"
    assert consumer.call("status", {"uid": uid})["state"] == "RESERVED"
    producer.call("release", {"uid": uid})
    consumer.call("release", {"uid": uid})


def test_repeats_and_a_hello_after_a_folded_connect(gateways):
    producer, consumer = gateways
    pair = LocalPair(producer, consumer)
    stream = pair.reserve(1)
    app = ["127.0.0.1:9"]
    stream.connect(app)
    uid, key = stream.uid, stream.key
    connect = {"uid": uid, "remote_listeners": stream.cons["listeners"], **_peer(stream.cons)}
    state = dump_state(producer.settings.state_dir)
    # A repeat connect, with the same hello or none, is the same success.
    for request in ({**connect, "hello": {"key": key, "app_listeners": app}}, connect):
        assert producer.call("connect", request)["state"] == "CONNECTED"
    # A hello after it: the same app listeners are a success, others are refused.
    assert producer.call("hello", {"uid": uid, "key": key, "role": "PROD",
                                   "app_listeners": app})["listeners"] == stream.prod["listeners"]
    assert dump_state(producer.settings.state_dir) == state  # nothing changed
    other = ["127.0.0.1:10"]
    assert isinstance(_refused(producer, "connect", {**connect, "hello": {
        "key": key, "app_listeners": other}}), BadFormat)
    assert isinstance(_refused(producer, "connect", {**connect, "hello": {
        "key": "wrong", "app_listeners": app}}), AuthError)
    assert isinstance(_refused(producer, "hello", {"uid": uid, "key": key, "role": "PROD",
                                                   "app_listeners": other}), BadFormat)
    assert isinstance(_refused(producer, "hello", {"uid": uid, "key": "wrong", "role": "PROD",
                                                   "app_listeners": app}), AuthError)
    status = producer.call("status", {"uid": uid})
    assert status["state"] == "CONNECTED" and status["alive"]
    stream.release()
    # Released: a connect carrying the hello finds no stream to connect.
    assert isinstance(_refused(producer, "connect", {**connect, "hello": {
        "key": key, "app_listeners": app}}), InvalidUid)

