"""``prefect deploy`` of the repository's prefect.yaml, run by a ``prefect worker`` that
has no source checkout: its working directory is an empty temp dir and its PYTHONPATH
holds no part of the repository, so the flows can only come from the installed package,
by module path."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from conftest import run_consumer
from deploykit import Served, forget_deployments, prefect_env, read_deployment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "scistream"


def _outside_env() -> dict:
    """The harness's API, and a PYTHONPATH without the checkout (the network guard only)."""
    env = prefect_env()
    guard = str(REPO / "tests" / "netguard_site")
    env["PYTHONPATH"] = guard
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # pick the run up at once
    return env


def _prefect(*args: str, cwd: Path) -> str:
    done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=_outside_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _active(*gateways) -> list[int]:
    return [gw.call("gateway_info", {})["active_streams"] for gw in gateways]


def test_a_worker_without_a_checkout_runs_the_deployed_flows(tmp_path, gateways,
                                                            producer_app):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    forget_deployments("open-stream/scistream", "release-stream/scistream")
    with get_client(sync_client=True) as client:
        if POOL not in {p.name for p in client.read_work_pools()}:
            _prefect("work-pool", "create", POOL, "--type", "process", cwd=outside)
    _prefect("deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml"), cwd=outside)
    deployment = read_deployment("open-stream/scistream")
    assert deployment.entrypoint == "scistream_prefect.flows.streams.open_stream"
    # No step points the worker at the deploying machine's directory.
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "."}}]

    worker = Served([PREFECT, "worker", "start", "--pool", POOL], tmp_path / "worker.log",
                    cwd=outside, env=_outside_env())
    try:
        producer, consumer = gateways
        app = producer_app(2, 4 << 20)
        uid = str(uuid.uuid4())
        run = run_deployment("open-stream/scistream", timeout=300, parameters={
            "producer": {"settings_path": str(producer.settings_path)},
            "consumer": {"settings_path": str(consumer.settings_path)},
            "num_conn": 2, "app_listeners": app.listeners, "uid": uid,
        })
        assert run.state.is_completed(), (run.state, worker.tail())
        listeners = consumer.call("status", {"uid": uid})["listeners"]
        code, received = run_consumer(listeners)
        assert code == 0 and sum(r["bytes"] for r in received) == 4 << 20

        done = run_deployment("release-stream/scistream", timeout=300, parameters={
            "producer": {"settings_path": str(producer.settings_path)},
            "consumer": {"settings_path": str(consumer.settings_path)}, "uid": uid,
        })
        assert done.state.is_completed(), (done.state, worker.tail())
        assert _active(producer, consumer) == [0, 0]
        # The worker ran them (not some other process serving the same names).
        assert str(run.id) in worker.tail() or str(done.id) in worker.tail(), worker.tail()
    finally:
        worker.stop()
    assert not [p for p in outside.iterdir() if p.name != "__pycache__"], \
        list(outside.iterdir())


def test_the_flows_load_by_module_outside_the_tree(tmp_path):
    """What the worker does with the entrypoint, in a bare interpreter outside the tree."""
    code = ("from prefect.flows import load_flow_from_entrypoint as load; "
            "f = load('scistream_prefect.flows.streams.open_stream'); "
            "import scistream_prefect, sys; print(f.name, scistream_prefect.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_outside_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    name, origin = done.stdout.split()
    assert name == "open-stream"
    assert not origin.startswith(str(tmp_path))
    assert os.path.exists(origin)
