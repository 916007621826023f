"""Prefect conventions of the client: what a run's log says, task run names, bounded
flow parameters; on real local gateways and Prefect's harness."""

from __future__ import annotations

import secrets
import uuid

import pytest
from prefect import flow
from prefect.utilities.callables import parameter_schema

from scistream_gateway.errors import BadFormat
from scistream_prefect import open_stream, release_stream, setup_stream, teardown_stream
from scistream_prefect.tasks import reserve_gateway_ports

from recordkit import run_records


def _active(*gateways) -> list[int]:
    return [gw.call("gateway_info", {})["active_streams"] for gw in gateways]


def test_a_runs_log_says_who_did_what_and_holds_no_secret(gateways, producer_app):
    producer, consumer = gateways
    app = producer_app(1, 1024)
    key, uid = secrets.token_urlsafe(32), str(uuid.uuid4())

    @flow
    def pipeline():
        handle = setup_stream(producer, consumer, num_conn=1, app_listeners=app.listeners,
                              uid=uid, hello_key=key)
        teardown_stream(producer, consumer, handle.uid)
        return handle

    state = pipeline(return_state=True)
    handle = state.result()
    p, c = producer.label, consumer.label
    expect = [
        f"reserve on {p}, stream {uid}: ok in ", f"reserve on {c}, stream {uid}: ok in ",
        f"connect on {p}, stream {uid}: ok in ",
        f"connect on {c}, stream {uid}: ok in ", f"release on {p}, stream {uid}: ok in ",
        f"release on {c}, stream {uid}: ok in ",
        f"stream {uid} open: consumer app connects to {handle.listeners[0]} ({c}), "
        f"producer gateway listens at {handle.producer_listeners[0]} ({p}), producer app "
        f"at {app.listeners[0]}, TLS, 1 connection, setup ",
        f"stream {uid} released on {p} and {c}",
    ]
    records = run_records(state.state_details.flow_run_id, expect=expect)
    names = sorted(t.name for t in records.task_runs)
    # The two concurrent reserves (and connects) tell apart by their gateway.
    # The producer's hello rides on its connect: no hello task of its own. The releases
    # are direct calls (their lines above), no task runs.
    assert {f"reserve-{p}", f"reserve-{c}", f"connect-{p}", f"connect-{c}"} == set(names)
    assert len(names) == len(set(names))
    leaked = [text for text in records.texts() if key in text]
    assert not leaked, leaked[0][:2000] if leaked else ""


def test_a_refused_call_logs_its_error_code(gateways):
    producer, _ = gateways
    uid = str(uuid.uuid4())

    @flow
    def pipeline():
        reserve_gateway_ports(producer, uid, "PROD", 1, secrets.token_urlsafe(32))
        reserve_gateway_ports(producer, uid, "CONS", 1, secrets.token_urlsafe(32))

    state = pipeline(return_state=True)
    producer.call("release", {"uid": uid})
    assert state.is_failed()
    # The same uid with other parameters: refused, and the refusal's code is logged.
    line = f"reserve on {producer.label}, stream {uid}: BAD_FORMAT in "
    records = run_records(state.state_details.flow_run_id, expect=[line])
    assert sum(line in m for m in records.messages()) == 1


def test_the_open_flows_parameters_carry_their_bounds():
    schema = parameter_schema(open_stream.fn).model_dump()["properties"]
    assert (schema["num_conn"]["minimum"], schema["num_conn"]["maximum"]) == (1, 65535)
    assert (schema["rate"]["minimum"], schema["rate"]["maximum"]) == (0, 10**9)
    lease = next(s for s in schema["lease_s"]["anyOf"] if s.get("type") == "integer")
    assert lease["minimum"] == 1 and lease["maximum"] >= 86400
    assert schema["hello_timeout_s"]["minimum"] == 0 and schema["hello_timeout_s"]["maximum"]
    listeners = next(s for s in schema["app_listeners"]["anyOf"] if s.get("type") == "array")
    assert listeners["minItems"] == 1


@pytest.mark.parametrize("bad", [{"num_conn": 0}, {"num_conn": 70000}, {"rate": -1},
                                 {"lease_s": 0}, {"hello_timeout_s": -1.0},
                                 {"app_listeners": []}])
def test_a_bad_parameter_fails_before_any_gateway_call(gateways, bad):
    producer, consumer = gateways
    arguments = {"num_conn": 1, "app_listeners": ["127.0.0.1:9"], **bad}
    before = [gw.call("gateway_info", {})["free_ports"] for gw in gateways]
    state = open_stream(producer, consumer, return_state=True, **arguments)
    assert state.is_failed()
    assert "Validation of flow parameters failed" in state.message, state.message
    assert next(iter(bad)) in state.message
    assert [gw.call("gateway_info", {})["free_ports"] for gw in gateways] == before
    assert _active(producer, consumer) == [0, 0]
    # A plain Python caller gets BAD_FORMAT, naming the argument.
    with pytest.raises(BadFormat, match=next(iter(bad))):
        setup_stream(producer, consumer, **arguments)
    assert _active(producer, consumer) == [0, 0]


def test_a_task_given_a_bad_value_is_still_bad_format(gateways):
    producer, _ = gateways
    with pytest.raises(BadFormat, match="num_conn"):
        reserve_gateway_ports(producer, str(uuid.uuid4()), "CONS", 0, "key")
    assert _active(producer) == [0]


def test_release_stream_logs_what_it_released(gateways, producer_app):
    producer, consumer = gateways
    app = producer_app(1, 1024)
    handle = open_stream(producer, consumer, num_conn=1, app_listeners=app.listeners)
    state = release_stream(producer, consumer, handle.uid, return_state=True)
    run_records(state.state_details.flow_run_id,
                expect=[f"stream {handle.uid} released on {producer.label} and "
                        f"{consumer.label}"])
    assert _active(producer, consumer) == [0, 0]
