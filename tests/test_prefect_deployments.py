"""Deployments: runs triggered through Prefect's API, executed by a served process.

``scistream serve`` (a real subprocess, pointed at the harness's API) serves
open-stream and release-stream; ``run_deployment`` starts them with gateway blocks
given as parameters, against local gateways. A second served flow holds a stream in a
session and is cancelled through the API: its on_cancellation hook releases the stream.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from conftest import run_consumer
from deploykit import (  # noqa: F401 - served_scistream_fixture: a fixture
    Served,
    forget_deployments,
    prefect_env,
    read_deployment,
    served_scistream_fixture,
    wait_for,
)

pytestmark = pytest.mark.slow


def _active(*gateways) -> list[int]:
    return [gw.call("gateway_info", {})["active_streams"] for gw in gateways]


def test_open_and_release_run_from_the_api_on_the_served_process(served_scistream, gateways,
                                                                  producer_app):
    producer, consumer = gateways
    app = producer_app(2, 8 << 20)
    uid = str(uuid.uuid4())
    # Parameters as the Prefect UI sends them: JSON, a gateway block as its fields.
    run = run_deployment("open-stream/scistream", timeout=240, parameters={
        "producer": {"settings_path": str(producer.settings_path)},
        "consumer": {"settings_path": str(consumer.settings_path)},
        "num_conn": 2, "app_listeners": app.listeners, "uid": uid,
    })
    assert run.state.is_completed(), (run.state, served_scistream.tail())
    assert _active(producer, consumer) == [1, 1]
    listeners = producer.call("status", {"uid": uid})["listeners"]
    consumer_listeners = consumer.call("status", {"uid": uid})["listeners"]
    assert len(listeners) == len(consumer_listeners) == 2
    code, received = run_consumer(consumer_listeners)
    assert code == 0 and sum(r["bytes"] for r in received) == 8 << 20
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert {a.key for a in artifacts} == {f"scistream-listeners-{uid}", f"scistream-stream-{uid}"}

    done = run_deployment("release-stream/scistream", timeout=240, parameters={
        "producer": {"settings_path": str(producer.settings_path)},
        "consumer": {"settings_path": str(consumer.settings_path)}, "uid": uid,
    })
    assert done.state.is_completed(), (done.state, served_scistream.tail())
    assert _active(producer, consumer) == [0, 0]


HOLDING_FLOW = textwrap.dedent('''
    import os
    import time
    from prefect import flow
    from scistream_prefect import LocalGateway, release_session_streams, stream_session

    @flow(on_cancellation=[release_session_streams], on_crashed=[release_session_streams])
    def hold_stream(producer: LocalGateway, consumer: LocalGateway, app_listeners: list[str],
                    pid_file: str):
        with stream_session(producer, consumer, num_conn=1, app_listeners=app_listeners):
            with open(pid_file, "w") as out:
                out.write(str(os.getpid()))
            time.sleep(3600)

    if __name__ == "__main__":
        hold_stream.serve(name="hold")
''')


@pytest.fixture
def served_holder(tmp_path):
    script = tmp_path / "holding.py"
    script.write_text(HOLDING_FLOW)
    served = Served([sys.executable, str(script)], tmp_path / "hold.log", cwd=tmp_path)
    try:
        wait_for(lambda: served.proc.poll() is not None or read_deployment("hold-stream/hold"),
              "the served hold-stream deployment")
        assert served.proc.poll() is None, served.tail()
        yield served
    finally:
        served.stop()


def _hold(producer, consumer, app, pid_file: Path):
    run = run_deployment("hold-stream/hold", timeout=0, parameters={
        "producer": {"settings_path": str(producer.settings_path)},
        "consumer": {"settings_path": str(consumer.settings_path)},
        "app_listeners": app.listeners, "pid_file": str(pid_file),
    })
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the session's stream")
    assert _active(producer, consumer) == [1, 1]
    return run, int(pid_file.read_text())


def test_a_cancelled_run_releases_its_stream(served_holder, gateways, producer_app, tmp_path):
    """Cancelled through the API: Prefect interrupts the flow, the session releases, and
    the on_cancellation hook runs after it (finding nothing left to release)."""
    from prefect.states import Cancelling

    producer, consumer = gateways
    run, _ = _hold(producer, consumer, producer_app(1, 1024), tmp_path / "pid")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)

        def cancelled():
            state = client.read_flow_run(run.id).state
            return state.is_cancelled() and _active(producer, consumer) == [0, 0]

        wait_for(cancelled, "the run cancelled and its stream released", timeout=240)
    wait_for(lambda: "Hook 'release_session_streams' finished running successfully"
          in served_holder.tail(), "the cancellation hook", timeout=60)


def test_a_killed_run_is_released_by_the_hook_from_stored_identifiers(
        served_holder, gateways, producer_app, tmp_path):
    """The flow's process is SIGKILLed: no finally runs in it. The runner marks the run
    crashed and runs its hook, which releases from the identifiers the session stored."""
    from prefect.variables import Variable

    producer, consumer = gateways
    run, pid = _hold(producer, consumer, producer_app(1, 1024), tmp_path / "pid")
    assert Variable.get(f"scistream-session-{run.id}", default=None)
    os.kill(pid, signal.SIGKILL)
    with get_client(sync_client=True) as client:
        wait_for(lambda: client.read_flow_run(run.id).state.is_crashed()
              and _active(producer, consumer) == [0, 0]
              and Variable.get(f"scistream-session-{run.id}", default=None) is None,
              "the crashed run's stream released by the hook", timeout=240)
    assert "Running hook 'release_session_streams' in response to entering state 'Crashed'" \
        in served_holder.tail()


def test_prefect_yaml_deploys_both_flows_to_a_process_pool(tmp_path):
    """``prefect deploy --all`` accepts prefect.yaml as shipped (against the harness)."""
    root = Path(__file__).parent.parent
    env = prefect_env()
    forget_deployments("open-stream/scistream", "release-stream/scistream")
    pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "scistream",
                           "--type", "process", "--overwrite"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=root)
    assert pool.returncode == 0, pool.stdout[-2000:] + pool.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("open-stream/scistream", "release-stream/scistream"):
        deployment = read_deployment(name)
        assert deployment is not None and deployment.work_pool_name == "scistream", name
        assert deployment.entrypoint.startswith("scistream_prefect.flows.streams.")  # a module
        assert "producer" in deployment.parameter_openapi_schema["properties"]
