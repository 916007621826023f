"""The session context manager and the artifacts, on real local gateways and Prefect's harness."""

from __future__ import annotations

import json
import secrets
import time
import uuid

import pytest
from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.variables import Variable

from scistream_prefect import release_session_streams, stream_session
from scistream_prefect.recovery import forgotten

from conftest import run_consumer
from recordkit import run_records


def _active(*gateways) -> list[int]:
    return [gw.call("gateway_info", {})["active_streams"] for gw in gateways]


def _artifacts(uid: str) -> dict[str, object]:
    """The latest artifact of each of the stream's keys."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(like_=uid)))
    return {a.key: a for a in found}


def test_a_session_moves_data_renews_its_lease_and_releases(gateways, producer_app):
    producer, consumer = gateways
    app = producer_app(2, 8 << 20)
    seen: dict = {}

    @flow(on_cancellation=[release_session_streams], on_crashed=[release_session_streams])
    def pipeline():
        with stream_session(producer, consumer, num_conn=2, app_listeners=app.listeners,
                            lease_s=30, renew_every_s=0.2) as stream:
            seen["uid"], seen["lease"] = stream.uid, stream.lease_expires
            seen["active"] = _active(producer, consumer)
            seen["consumer"] = run_consumer(stream.listeners)
            # While the session is open, its lease keeps moving forward.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = producer.call("status", {"uid": stream.uid})
                if status["lease_expires"] > seen["lease"] + 0.5:
                    break
                time.sleep(0.1)
            seen["renewed"] = status["lease_expires"]
            seen["variable"] = Variable.get(f"scistream-session-{_flow_run_id()}")
        return "done"

    assert pipeline() == "done"
    assert seen["active"] == [1, 1] and _active(producer, consumer) == [0, 0]
    code, received = seen["consumer"]
    assert code == 0 and sum(r["bytes"] for r in received) == 8 << 20
    assert seen["renewed"] > seen["lease"] + 0.5
    # The identifiers the cancellation hook would need were stored while open (no key)...
    assert set(seen["variable"]) == {seen["uid"]}
    assert seen["variable"][seen["uid"]]["producer"]["block"] == "LocalGateway"
    # ... and are gone after the release (written in the background, as the release
    # itself does not wait for a busy server).
    assert forgotten(timeout_s=60)
    with get_client(sync_client=True) as client:
        assert not [v for v in client.read_variables() if seen["uid"] in str(v.value)]
    artifacts = _artifacts(seen["uid"])
    summary = artifacts[f"scistream-stream-{seen['uid']}"]
    assert "**RELEASED**" in summary.data and producer.label in summary.data
    table = artifacts[f"scistream-listeners-{seen['uid']}"]
    assert all(a in str(table.data) for a in app.listeners)


def _flow_run_id():
    from prefect.context import FlowRunContext

    return FlowRunContext.get().flow_run.id


@pytest.mark.slow
def test_a_failing_block_still_releases_and_the_error_is_the_users(gateways, producer_app):
    producer, consumer = gateways
    app = producer_app(1, 1024)
    seen: dict = {}

    @flow
    def pipeline():
        with stream_session(producer, consumer, num_conn=1, app_listeners=app.listeners) as s:
            seen["uid"] = s.uid
            raise ValueError("the analysis broke")

    with pytest.raises(ValueError, match="analysis broke"):
        pipeline()
    assert _active(producer, consumer) == [0, 0]
    assert forgotten(timeout_s=60)  # the summary is published in the background
    summary = _artifacts(seen["uid"])[f"scistream-stream-{seen['uid']}"]
    assert "RELEASED after ValueError" in summary.data


@pytest.mark.slow
def test_the_hook_releases_from_stored_identifiers_alone(gateways, producer_app):
    """What a cancelled deployment run does: the flow's process is gone, the hook runs
    elsewhere with only the flow run. Here the run ends in the state a killed session
    leaves (stream open, identifiers stored), then the hook gets the run's record.
    ``test_prefect_deployments`` cancels a real served run."""
    from scistream_prefect.flows.streams import setup_stream
    from scistream_prefect.recovery import remember_stream

    producer, consumer = gateways
    app = producer_app(1, 1024)
    seen: dict = {}

    @flow
    def pipeline():
        handle = setup_stream(producer, consumer, num_conn=1, app_listeners=app.listeners)
        seen["run_id"], seen["uid"] = _flow_run_id(), handle.uid
        remember_stream(seen["run_id"], handle.uid, producer, consumer)

    pipeline()
    assert _active(producer, consumer) == [1, 1]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(seen["run_id"])
    release_session_streams(None, flow_run, flow_run.state)
    assert _active(producer, consumer) == [0, 0]
    assert Variable.get(f"scistream-session-{seen['run_id']}", default=None) is None
    # The hook's lines are the run's: a reader of its log in the UI sees both releases.
    run_records(flow_run.id, expect=[f"released stream {seen['uid']} on {gw.label}"
                                     for gw in (producer, consumer)])


@pytest.mark.slow
def test_the_hello_key_is_in_no_artifact_log_or_record(gateways, producer_app):
    """Searched: the handle, the session's stored identifiers, the artifacts, and the
    run's own records (its flow run, its task runs, every log line of either); a marker
    logged by the flow and one by a task prove the search reads the run's lines."""
    producer, consumer = gateways
    app = producer_app(1, 1024)
    key = secrets.token_urlsafe(32)
    uid = str(uuid.uuid4())
    markers = [f"flow marker {uuid.uuid4()}", f"task marker {uuid.uuid4()}"]
    seen: dict = {}

    @task
    def mark(text: str) -> None:
        get_run_logger().info(text)

    @flow
    def pipeline():
        get_run_logger().info(markers[0])
        with stream_session(producer, consumer, num_conn=1, app_listeners=app.listeners,
                            uid=uid, hello_key=key) as stream:
            mark(markers[1])
            seen["variable"] = Variable.get(f"scistream-session-{_flow_run_id()}")
            return stream

    state = pipeline(return_state=True)
    handle = state.result()
    assert handle.uid == uid and key not in repr(handle) and key not in str(vars(handle))
    assert uid in json.dumps(seen["variable"]) and key not in json.dumps(seen["variable"])
    artifacts = _artifacts(uid)
    assert len(artifacts) == 2
    assert all(key not in a.model_dump_json() for a in artifacts.values())
    # The release's lines are the run's own (direct calls, no task runs): searched too.
    released = [f"release on {gw.label}, stream {uid}: ok in " for gw in gateways]
    records = run_records(state.state_details.flow_run_id, expect=markers + released)
    assert set(markers) <= set(records.messages())
    # The producer's hello (and its key) rides on its connect: no hello task of its own.
    names = {t.name for t in records.task_runs}
    assert {f"{verb}-{gw.label}" for verb in ("reserve", "connect") for gw in gateways} <= names
    assert not any(name.startswith("hello-") for name in names), names
    leaked = [text for text in records.texts() if key in text]
    assert not leaked, leaked[0][:2000] if leaked else ""


def test_a_session_needs_a_flow(gateways):
    producer, consumer = gateways
    with pytest.raises(RuntimeError, match="inside a flow"):
        with stream_session(producer, consumer, app_listeners=["127.0.0.1:9"]):
            pass


def test_a_release_waits_for_no_background_write(gateways):
    """The summary's update and the record's removal go to the writer thread: with that
    thread held up, the session still ends (both ends released), and once it is free,
    both writes are made, in order, in the run's context."""
    import threading

    from scistream_prefect.recovery import in_background

    producer, consumer = gateways
    hold, seen = threading.Event(), {}

    @flow
    def pipeline():
        seen["run_id"] = _flow_run_id()
        in_background(hold.wait, 120)  # every write after this one waits for it
        with stream_session(producer, consumer, num_conn=1,
                            app_listeners=["127.0.0.1:9"]) as stream:
            seen["uid"] = stream.uid
        seen["released"] = _active(producer, consumer)
        seen["pending"] = not forgotten(timeout_s=0)

    pipeline()
    try:
        assert seen["released"] == [0, 0] and seen["pending"]
        assert Variable.get(f"scistream-session-{seen['run_id']}", default=None) is not None
    finally:
        hold.set()
    assert forgotten(timeout_s=60)
    assert Variable.get(f"scistream-session-{seen['run_id']}", default=None) is None
    summary = _artifacts(seen["uid"])[f"scistream-stream-{seen['uid']}"]
    assert "**RELEASED**" in summary.data
    assert str(summary.flow_run_id) == str(seen["run_id"])  # the run's, though written later


class _Refusing:
    """A real gateway whose first ``refusals`` releases raise ``error`` at the seam (as
    a gateway busy with a reserve of the uid says UNAVAILABLE)."""

    def __init__(self, gateway, error: Exception, refusals: int):
        self.gateway, self.label = gateway, gateway.label
        self.error, self.refusals = error, refusals

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict:
        if function == "release" and self.refusals:
            self.refusals -= 1
            raise self.error
        return self.gateway.call(function, request, timeout_s)


def _reserved(producer, consumer) -> str:
    from scistream_prefect import streams_core as core

    uid = str(uuid.uuid4())
    for gateway, role in ((producer, "PROD"), (consumer, "CONS")):
        core.reserve(gateway, uid, role, 1, "key")
    return uid


def test_a_release_that_may_pass_is_retried_and_logged_per_end(gateways):
    """teardown_stream's releases (direct calls, no task runs) are retried as the release
    task is, and each call is a line of the run's log."""
    from scistream_gateway.errors import Unavailable
    from scistream_prefect import teardown_stream

    producer, consumer = gateways
    uid = _reserved(producer, consumer)
    busy = _Refusing(producer, Unavailable("a reserve of this uid is in progress"), 1)

    @flow
    def pipeline():
        teardown_stream(busy, consumer, uid)

    state = pipeline(return_state=True)
    assert state.is_completed() and busy.refusals == 0
    assert _active(producer, consumer) == [0, 0]
    p, c = producer.label, consumer.label
    records = run_records(state.state_details.flow_run_id, expect=[
        f"release on {p}, stream {uid}: UNAVAILABLE in ", f"release on {p}, stream {uid}: ok in ",
        f"release on {c}, stream {uid}: ok in ", f"stream {uid} released on {p} and {c}"])
    assert not records.task_runs  # no task run of its own


def test_a_refused_release_fails_after_the_other_end_is_released(gateways):
    from scistream_gateway.errors import AuthError
    from scistream_prefect import teardown_stream

    producer, consumer = gateways
    uid = _reserved(producer, consumer)
    refusing = _Refusing(producer, AuthError("not proven"), 5)

    @flow
    def pipeline():
        teardown_stream(refusing, consumer, uid)

    state = pipeline(return_state=True)
    assert state.is_failed() and "not proven" in state.message
    assert refusing.refusals == 4  # a refusal is not retried
    assert _active(producer, consumer) == [1, 0]
    run_records(state.state_details.flow_run_id, expect=[
        f"release on {producer.label}, stream {uid}: AUTH_ERROR in ",
        f"stream {uid}: release failed on {producer.label}"])
    producer.call("release", {"uid": uid})
