"""The LocalGateway seam: serializer round trip, worker processes, failures mapped to codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from scistream_prefect import Timeout, Unavailable

from conftest import make_gateway
from gatewaykit import kill_workers, reserve


def test_a_call_that_outlives_its_timeout_is_killed_and_the_gateway_recovers(gateway_root):
    gw = make_gateway(gateway_root, "slow-gw")
    gw.call("gateway_info", {})
    with pytest.raises(Timeout, match="did not finish"):
        # wait_hello on an unknown uid fails fast, so use a long-poll on a real stream.
        uid, _, _ = reserve(gw)
        try:
            gw.call("wait_hello", {"uid": uid, "timeout_s": 5}, timeout_s=0.5)
        finally:
            gw.call("release", {"uid": uid})
    assert gw.call("gateway_info", {})["active_streams"] == 0


def test_a_worker_that_dies_idle_is_replaced_transparently(gateway_root):
    gw = make_gateway(gateway_root, "fragile-gw", size=4)
    gw.warm_up()
    old = kill_workers(gw)
    assert len(old) == gw.workers
    assert gw.call("gateway_info", {})["name"] == "fragile-gw"
    new = gw.worker_pids()
    assert new and not set(old) & set(new)


def test_a_worker_that_dies_during_a_call_is_unavailable(gateway_root):
    import threading
    import time

    gw = make_gateway(gateway_root, "fragile-gw", size=4)
    uid, _, _ = reserve(gw)
    # With no worker left, the long-poll's pool starts one and hands it to the call the
    # moment it is ready: a worker that shows up below is the one running that call.
    gw.close()
    outcome: list[BaseException] = []

    def long_poll() -> None:
        try:
            gw.call("wait_hello", {"uid": uid, "timeout_s": 10})
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    poller = threading.Thread(target=long_poll)
    poller.start()
    deadline = time.monotonic() + 30
    while not gw.worker_pids():
        assert time.monotonic() < deadline, "no worker started for the long-poll"
        time.sleep(0.01)
    assert len(kill_workers(gw)) == 1
    poller.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
    assert "workers.log" in str(outcome[0])
    # The gateway carries on with a fresh worker; its state was never touched.
    assert gw.call("status", {"uid": uid})["state"] == "RESERVED"
    gw.call("release", {"uid": uid})


@pytest.mark.slow
def test_works_from_a_script_without_a_main_guard(gateway_root, tmp_path):
    """Workers never re-import the caller's __main__ (as multiprocessing's spawn would)."""
    gw = make_gateway(gateway_root, "script-gw")
    script = tmp_path / "pipeline.py"
    script.write_text(textwrap.dedent(f"""
        from scistream_prefect import LocalGateway
        gw = LocalGateway(settings_path={str(gw.settings_path)!r})
        print(gw.call("gateway_info", {{}})["name"])
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "script-gw"


def test_requests_really_cross_the_globus_compute_serializer(gateway_root):
    """What the SDK's serializer cannot carry never reaches a worker."""
    from scistream_prefect import BadFormat

    gw = make_gateway(gateway_root, "serde-gw")
    with pytest.raises(BadFormat, match="does not serialize"):
        gw.call("status", {"uid": (c for c in "generator")})
    # Data is JSON (JSONData), as the shipped endpoint configs require: a set does not go.
    with pytest.raises(BadFormat, match="does not serialize"):
        gw.call("status", {"uid": {"not", "a", "string"}})
    # JSON the gateway does not accept is refused by the gateway itself.
    with pytest.raises(BadFormat, match="uid"):
        gw.call("status", {"uid": ["not", "a", "string"]})


@pytest.mark.slow
def test_a_stream_outlives_the_workers_that_started_it(gateways, producer_app):
    """Proxies are detached (own session, reparented): killing every worker process of
    both gateways, as an endpoint restart would, does not touch a running stream."""
    from scistream_prefect import open_stream, release_stream

    from conftest import run_consumer

    producer, consumer = gateways
    app = producer_app(2, 32 << 20)
    handle = open_stream(producer, consumer, num_conn=2, app_listeners=app.listeners)
    try:
        for gw in (producer, consumer):
            kill_workers(gw)
        code, received = run_consumer(handle.listeners)
        assert code == 0 and sum(r["bytes"] for r in received) == 32 << 20
        assert sorted(r["sha256"] for r in received) == sorted(r["sha256"] for r in app.result())
    finally:
        release_stream(producer, consumer, handle.uid)


def test_a_local_worker_deserializes_no_pickle(gateway_root):
    """Like an endpoint with the shipped config, a local worker refuses pickled arguments
    (DillDataBase64) before any gateway function runs."""
    from globus_compute_sdk.serialize import ComputeSerializer, DillCodeSource

    from scistream_gateway.functions import ALL
    from scistream_gateway.local_worker import make_serializer, run_packed

    pickled = ComputeSerializer(strategy_code=DillCodeSource())  # data: the SDK's default
    payload = pickled.pack_buffers([pickled.serialize(ALL["gateway_info"]),
                                    pickled.serialize(({},)), pickled.serialize({})])
    reply = make_serializer().deserialize(run_packed(payload))
    assert reply["error"]["code"] == "BAD_FORMAT"
    assert "DillDataBase64" in reply["error"]["message"]
