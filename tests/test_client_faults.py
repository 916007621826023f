"""Client faults: the client's flow fails, its run is cancelled, or its process is killed,
after ``reserve`` or after ``connect``. Both gateways end up with nothing of the
stream: state RELEASED (EXPIRED where only the lease could end it), no proxy process,
every port bindable, no key directory, no Variable left.

Checked with the gateways' own ``status`` / ``gateway_info``, their state directories
and ``proxy_pids``, on real local gateways, Prefect's test harness and real served runs.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.variables import Variable

from scistream_gateway.errors import InvalidUid, Timeout
from scistream_prefect import release_session_streams, setup_stream, stream_session
from scistream_prefect.recovery import forgotten
from scistream_proxy.leaks import port_is_free, proxy_pids

from conftest import run_consumer
from deploykit import served_scistream_fixture, wait_for  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow


def _status(gateway, uid: str) -> dict:
    return gateway.call("status", {"uid": uid})


def assert_gone(gateway, uid: str, listeners: list[str], state: str = "RELEASED") -> None:
    """Nothing of stream ``uid`` is left on ``gateway``."""
    status = _status(gateway, uid)
    assert status["state"] == state and status["alive"] is False, status
    info = gateway.call("gateway_info", {})
    settings = gateway.settings
    assert info["active_streams"] == 0
    assert info["free_ports"] == settings.port_max - settings.port_min + 1
    assert not (settings.state_dir / "streams" / uid).exists()
    assert proxy_pids(under=settings.state_dir) == []
    assert listeners and all(port_is_free(a) for a in listeners), listeners


def _wait_reserved(producer, consumer, uid: str, timeout: float = 180) -> list[list[str]]:
    """Both ends reserved (the client now waits for the producer's hello); their listeners."""
    def reserved():
        try:
            ends = [_status(gw, uid) for gw in (producer, consumer)]
        except InvalidUid:
            return None
        return ends if all(e["state"] == "RESERVED" for e in ends) else None

    return [end["listeners"] for end in wait_for(reserved, "both ends reserved", timeout, 0.2)]


def _no_variable_left(uid: str) -> bool:
    """No Variable names the stream, once this process's record updates are written
    (they are written in the background: recovery.forget_stream)."""
    assert forgotten(timeout_s=60)
    with get_client(sync_client=True) as client:
        return not [v for v in client.read_variables() if uid in str(v.value)]


def test_a_flow_failing_after_reserve_releases_both_ends(gateways):
    """No hello comes: the wait times out inside setup, which releases both ends."""
    producer, consumer = gateways
    uid, seen = str(uuid.uuid4()), {}

    @flow
    def pipeline():
        try:
            setup_stream(producer, consumer, num_conn=3, uid=uid,
                         hello_key=secrets.token_urlsafe(32), hello_timeout_s=1.0)
        finally:
            seen["listeners"] = [_status(gw, uid)["listeners"] for gw in (producer, consumer)]

    with pytest.raises(Timeout, match="no hello"):
        pipeline()
    for gw, listeners in zip((producer, consumer), seen["listeners"], strict=True):
        assert len(listeners) == 3
        assert_gone(gw, uid, listeners)
    assert _no_variable_left(uid)


def test_a_flow_failing_after_connect_releases_both_ends(gateways, producer_app):
    """Data flowed, then the user's flow raised inside its session."""
    producer, consumer = gateways
    app = producer_app(2, 1 << 20)
    seen = {}

    @flow(on_cancellation=[release_session_streams], on_crashed=[release_session_streams])
    def pipeline():
        with stream_session(producer, consumer, num_conn=2, app_listeners=app.listeners) as s:
            seen["uid"], seen["listeners"] = s.uid, [s.producer_listeners, s.listeners]
            seen["consumer"] = run_consumer(s.listeners)
            assert [_status(gw, s.uid)["state"] for gw in (producer, consumer)] == \
                ["CONNECTED"] * 2
            raise RuntimeError("the analysis broke after the stream was connected")

    with pytest.raises(RuntimeError, match="analysis broke"):
        pipeline()
    code, received = seen["consumer"]
    assert code == 0 and sum(r["bytes"] for r in received) == 1 << 20
    for gw, listeners in zip((producer, consumer), seen["listeners"], strict=True):
        assert_gone(gw, seen["uid"], listeners)
    assert _no_variable_left(seen["uid"])


def _open_waiting_for_hello(producer, consumer, uid: str, key_block: str) -> object:
    """Start open-stream on the served process; it reserves, then waits for a hello."""
    return run_deployment("open-stream/scistream", timeout=0, parameters={
        "producer": {"settings_path": str(producer.settings_path)},
        "consumer": {"settings_path": str(consumer.settings_path)},
        "num_conn": 2, "uid": uid, "hello_key_block": key_block, "hello_timeout_s": 600,
    })


def _flow_run_pid(run_id) -> int | None:
    """The process running flow run ``run_id`` (the runner starts one per run)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ:
            return int(proc.name)
    return None


@pytest.fixture
def key_block():
    from prefect.blocks.system import Secret

    name = f"faults-key-{secrets.token_hex(4)}"
    Secret(value=secrets.token_urlsafe(32)).save(name)
    return name


def test_a_cancelled_open_stream_run_waiting_for_hello_releases_both_ends(
        served_scistream, gateways, key_block):
    from prefect.states import Cancelling

    producer, consumer = gateways
    uid = str(uuid.uuid4())
    run = _open_waiting_for_hello(producer, consumer, uid, key_block)
    listeners = _wait_reserved(producer, consumer, uid)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)
        wait_for(lambda: client.read_flow_run(run.id).state.is_cancelled()
              and _active(producer, consumer) == [0, 0],
              "the run cancelled and both ends released", timeout=240)
    for gw, ls in zip((producer, consumer), listeners, strict=True):
        assert_gone(gw, uid, ls)
    wait_for(lambda: _no_variable_left(uid), "the run's record of the stream dropped", 60)


def test_a_killed_open_stream_run_waiting_for_hello_is_released_by_its_hook(
        served_scistream, gateways, key_block):
    """SIGKILL while waiting for the hello: nothing runs in the flow's process. The
    runner marks the run crashed and its hook releases from the identifiers stored
    before the first reserve."""
    producer, consumer = gateways
    uid = str(uuid.uuid4())
    run = _open_waiting_for_hello(producer, consumer, uid, key_block)
    listeners = _wait_reserved(producer, consumer, uid)
    pid = wait_for(lambda: _flow_run_pid(run.id), "the flow run's process", 30, 0.1)
    assert Variable.get(f"scistream-session-{run.id}", default=None)
    os.kill(pid, signal.SIGKILL)
    with get_client(sync_client=True) as client:
        wait_for(lambda: client.read_flow_run(run.id).state.is_crashed()
              and _active(producer, consumer) == [0, 0],
              "the crashed run's stream released by its hook", timeout=240)
    for gw, ls in zip((producer, consumer), listeners, strict=True):
        assert_gone(gw, uid, ls)
    assert Variable.get(f"scistream-session-{run.id}", default=None) is None
    hook = "Running hook 'release_session_streams' in response to entering state 'Crashed'"
    wait_for(lambda: hook in served_scistream.log.read_text(), "the runner's log of the hook", 60)


def _active(*gateways) -> list[int]:
    return [gw.call("gateway_info", {})["active_streams"] for gw in gateways]


def test_a_killed_client_process_leaks_nothing_after_its_lease(gateways, tmp_path, key_block):
    """``scistream open`` SIGKILLed in a terminal while it waits for the hello: no Prefect
    runner is left to run a hook, so the lease is the last line: once it ran out, the
    next call on each gateway reaps the stream (EXPIRED), its proxy and its ports."""
    from prefect.settings import PREFECT_API_URL

    producer, consumer = gateways
    uid, lease = str(uuid.uuid4()), 4
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), HOME=str(tmp_path))
    opener = subprocess.Popen(
        [sys.executable, "-m", "scistream_prefect.cli", "open", "--producer",
         str(producer.settings_path), "--consumer", str(consumer.settings_path),
         "--num-conn", "2", "--uid", uid, "--hello-key-block", key_block,
         "--lease", str(lease), "--hello-timeout", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        listeners = _wait_reserved(producer, consumer, uid)
        reserved_at = time.time()
        opener.kill()
        opener.wait()
        # Until the lease runs out the stream is held (nobody released it) ...
        assert [_status(gw, uid)["state"] for gw in (producer, consumer)] == ["RESERVED"] * 2
        assert proxy_pids(under=producer.settings.state_dir)
        time.sleep(max(0.0, reserved_at + lease + 0.5 - time.time()))
        # ... then any call reaps it.
        for gw, ls in zip((producer, consumer), listeners, strict=True):
            assert_gone(gw, uid, ls, state="EXPIRED")
    finally:
        if opener.poll() is None:
            opener.kill()
            opener.wait()
        opener.stderr.close()
