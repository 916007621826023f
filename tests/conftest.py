"""Shared fixtures: Prefect's test harness, local gateways on loopback, leak checks.

Everything here is real: gateway functions run in worker processes after the Globus
Compute serializer round trip, proxies are real detached processes, state is SQLite.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The session's own client key (scistream_prefect.ownership), never the user's.
if "SCISTREAM_CONFIG_DIR" not in os.environ:
    os.environ["SCISTREAM_CONFIG_DIR"] = tempfile.mkdtemp(prefix="scistream-test-config-")
    atexit.register(shutil.rmtree, os.environ["SCISTREAM_CONFIG_DIR"], True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Tests read runs' log lines back from the API (marker lines at INFO). The level is
# fixed here, before Prefect and the benches are imported: a bench module sets WARNING
# by default for its own output when imported, and the harness's settings would take it.
os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import netguard  # noqa: E402

# No test may reach beyond this machine (the Globus cloud in particular): every socket
# of the test process, and of every Python subprocess it starts (through
# netguard_site/sitecustomize.py on PYTHONPATH), may connect only to loopback or a Unix
# socket.
netguard.install()
_TESTS = Path(__file__).parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(_TESTS / "netguard_site"), str(_TESTS), os.environ.get("PYTHONPATH"))
    if p)

from scistream_prefect import LocalGateway, LocalPair  # noqa: E402
from scistream_prefect.gateways import close_local_gateways  # noqa: E402
from scistream_proxy import apps  # noqa: E402
from scistream_proxy.leaks import proxy_pids  # noqa: E402

# Each gateway a test creates gets its own 40-port slice of 22000-28999, below the kernel's
# ephemeral range (32768-60999), so no outgoing connection can take a port a test expects
# free. The slices go round: a test's gateways are gone before 175 later gateways exist,
# and the ranges tests name themselves (29000 and up, 10000-21999) are never reached.
_PORT_SLICES = itertools.cycle(range(22000, 29000, 40))


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it. The benches set variables when they
    are imported (PREFECT_LOGGING_LEVEL, SCISTREAM_TEST_FAULTS), and every subprocess a
    later test starts (servers, runners, gateway workers) would inherit them."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _gateway_workers_stopped():
    """Every gateway's worker processes stop when the test ends: the pools would
    otherwise live until the session does (hundreds of processes, gigabytes). A
    module-scoped gateway starts new workers at its next call."""
    yield
    close_local_gateways()


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    from scistream_prefect.recovery import forgotten

    with prefect_test_harness(server_startup_timeout=120):
        yield
        forgotten(timeout_s=30)  # the last runs' record updates, while the server is up


def pytest_sessionfinish(session, exitstatus):
    """The Compute SDK's result watchers outlive the session (the SDK stops them at the
    interpreter's exit). Their brokers stopped with the tests' worlds, so they retry,
    and the SDK and globus-sdk log each try to a stream pytest has closed by then:
    dozens of "Logging error" tracebacks after the summary. Their loggers are off from
    here."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("globus_compute_sdk", "globus_sdk"):
            logging.getLogger(name).disabled = True


def make_gateway(root: Path, name: str, size: int = 40, **settings) -> LocalGateway:
    base = next(_PORT_SLICES)
    assert size <= 40
    return LocalGateway.create(name, root / name, port_range=(base, base + size - 1), **settings)


@pytest.fixture
def gateway_root(tmp_path: Path):
    """A directory for a test's gateways; afterwards no proxy of theirs may still run."""
    yield tmp_path
    leaked = proxy_pids(under=tmp_path)
    for pid in leaked:
        os.kill(pid, 9)
    assert not leaked, f"proxy processes left running: {leaked}"


@pytest.fixture
def gateways(gateway_root: Path, request):
    """A producer-side and a consumer-side local gateway on loopback, with the test
    module's ``GATEWAY_SETTINGS`` if it has any (e.g. ``allow_plain_tcp``). A proxy the
    test left running fails it (as ``gateway_root`` does), after the pair released it."""
    settings = getattr(request.module, "GATEWAY_SETTINGS", {})
    with LocalPair(make_gateway(gateway_root, "prod-gw", **settings),
                   make_gateway(gateway_root, "cons-gw", **settings)) as pair:
        yield pair.producer, pair.consumer
        left = pair.leftovers().processes
    assert not left, f"proxy processes left running: {left}"


class ProducerApp:
    """The stand-in producer app as a real process; ``listeners`` is where it listens."""

    def __init__(self, connections: int, total_bytes: int):
        self.proc, self.listeners = apps.start_producer(connections, total_bytes)

    def result(self, timeout: float = 120) -> list[dict]:
        out, _ = self.proc.communicate(timeout=timeout)
        return apps.connection_results(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_consumer(listeners: list[str], timeout: float = 120) -> tuple[int, list[dict]]:
    proc = subprocess.run([*apps.COMMAND, "consumer", *listeners, "--timeout", "30"],
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, apps.connection_results(proc.stdout)


@pytest.fixture
def producer_app():
    apps: list[ProducerApp] = []

    def start(connections: int, total_bytes: int) -> ProducerApp:
        app = ProducerApp(connections, total_bytes)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.close()
