"""The tasks return the wire's reply models, not dicts: in a flow, on real local gateways
and Prefect's harness; and a reply that is not its model is SERVER_ERR."""

from __future__ import annotations

import secrets
import time
import uuid

import pytest
from prefect import flow

from scistream_gateway.errors import ServerError
from scistream_gateway.protocol import (
    ConnectReply,
    GatewayInfoReply,
    HelloReply,
    ReserveReply,
    State,
    StatusReply,
)
from scistream_prefect import streams_core as core
from scistream_prefect.tasks import (
    connect_gateway_proxy,
    get_gateway_info,
    get_stream_status,
    release_gateway_stream,
    renew_stream_lease,
    reserve_gateway_ports,
    send_app_hello,
)


def test_each_task_returns_its_reply_model(gateways):
    producer, consumer = gateways
    uid, key = str(uuid.uuid4()), secrets.token_urlsafe(32)

    @flow
    def pipeline() -> dict:
        out: dict = {"info": get_gateway_info(producer)}
        p = out["reserve"] = reserve_gateway_ports(producer, uid, "PROD", 1, key)
        c = reserve_gateway_ports(consumer, uid, "CONS", 1, key)
        out["hello"] = send_app_hello(consumer, uid, key, "CONS")
        out["connect"] = connect_gateway_proxy(producer, uid, c.listeners, c.cert_fingerprint,
                                               c.certificate, hello_key=key,
                                               app_listeners=["127.0.0.1:9"])
        connect_gateway_proxy(consumer, uid, p.listeners, p.cert_fingerprint, p.certificate)
        out["status"] = get_stream_status(consumer, uid)
        out["renew"] = renew_stream_lease(consumer, uid, lease_s=600)
        out["release"] = [release_gateway_stream(gw, uid) for gw in (producer, consumer)]
        return out

    out = pipeline()
    assert isinstance(out["info"], GatewayInfoReply) and out["info"].free_ports > 0
    assert isinstance(out["reserve"], ReserveReply) and len(out["reserve"].listeners) == 1
    assert isinstance(out["hello"], HelloReply) and out["hello"].role == "CONS"
    assert isinstance(out["connect"], ConnectReply)
    assert out["connect"].state is State.CONNECTED and out["connect"].backend == "native"
    status = out["status"]
    assert isinstance(status, StatusReply) and status.state is State.CONNECTED
    assert status.alive is True and status.listeners == out["hello"].listeners
    assert isinstance(out["renew"], float) and 500 < out["renew"] - time.time() <= 600
    assert out["release"] == [True, True]


class _OtherVersion:
    """A real gateway whose replies to ``status`` gain a field (a newer gateway) or lose
    one (a broken or older one), standing at the seam where gateway functions run."""

    def __init__(self, gateway, change):
        self.gateway, self.change, self.label = gateway, change, gateway.label

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict:
        reply = self.gateway.call(function, request, timeout_s)
        return self.change(reply) if function == "status" else reply


def test_a_field_this_client_does_not_know_is_left_out(gateways):
    producer, _ = gateways
    uid = str(uuid.uuid4())
    core.reserve(producer, uid, "CONS", 1, "key")
    try:
        newer = _OtherVersion(producer, lambda reply: {**reply, "added_later": 1})
        status = core.status(newer, uid)
        assert status.state is State.RESERVED and "added_later" not in status.wire()
    finally:
        core.release(producer, uid)


def test_a_reply_that_is_not_its_model_is_server_err(gateways):
    producer, _ = gateways
    uid = str(uuid.uuid4())
    core.reserve(producer, uid, "CONS", 1, "key")
    try:
        broken = _OtherVersion(producer, lambda reply: {**reply, "alive": "perhaps",
                                                        "state": None})
        with pytest.raises(ServerError) as refused:
            core.status(broken, uid)
        assert refused.value.code == "SERVER_ERR"
        assert "['alive', 'state']" in refused.value.message, refused.value.message
        assert producer.label in refused.value.message
    finally:
        core.release(producer, uid)
