"""The randomized fault soak (bench/soak.py), short: a couple of dozen lifecycles with
injected faults across the host backends, no invariant violated; and the invariant
checker does see a leak when one is planted (so the soak can fail)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from backend_chain import skip_reason
from conftest import make_gateway
from scistream_proxy.process import ProcessIdentity

pytestmark = pytest.mark.slow

BENCH = Path(__file__).parent.parent / "bench" / "soak.py"
SOAK_PORTS = (10000, 10999)  # helper range of this suite (the docker one uses 11500-12999)


def _soak():
    spec = importlib.util.spec_from_file_location("scistream_soak", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_violates_no_invariant(tmp_path):
    backends = [b for b in ("native", "stunnel", "haproxy", "nginx")
                if b == "native" or not skip_reason(b)]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--lifecycles", "24", "--seed", "11", "--concurrency", "2",
         "--backends", ",".join(backends), "--port-base", str(SOAK_PORTS[0]),
         "--port-limit", str(SOAK_PORTS[1]), "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.stdout, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["lifecycles"] == 24
    assert report["faults_injected"] >= 15  # the seed draws a fault for most lifecycles
    assert report["violations"] == [], report["violations"]
    assert report["unexpected"] == [], report["unexpected"]
    assert proc.returncode == 0


@pytest.fixture
def soak():
    return _soak()


def _reserve(gw) -> dict:
    return gw.call("reserve", {"uid": str(uuid.uuid4()), "role": "CONS", "num_conn": 1,
                               "key_sha256": hashlib.sha256(b"k").hexdigest()})


def test_the_checker_sees_each_kind_of_planted_leak(gateway_root, soak):
    gw = make_gateway(gateway_root, "leaky", size=8)
    state = gw.settings.state_dir
    low, high = gw.settings.port_min, gw.settings.port_max

    def check() -> list[str]:
        return soak.check_gateway(state, "127.0.0.1", (low, high))

    reply = _reserve(gw)
    assert check() == []  # a live stream with its proxy and ports is fine
    # A stream directory (with a key) that no stream owns.
    orphan = state / "streams" / str(uuid.uuid4())
    orphan.mkdir()
    (orphan / "key.pem").write_text("secret")
    assert any("directory" in v for v in check())
    # ... and a process working in it.
    squatter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                cwd=orphan)
    try:
        assert any(f"process {squatter.pid}" in v for v in check())
    finally:
        squatter.kill()
        squatter.wait()
    orphan.joinpath("key.pem").unlink()
    orphan.rmdir()
    assert check() == []
    # A port of the range bound by no stream.
    squat = socket.create_server(("127.0.0.1", high))
    try:
        assert any(f"port {high} is bound" in v for v in check())
    finally:
        squat.close()
    # A row half done, and a recorded port of a released stream.
    db = sqlite3.connect(state / "state.sqlite3")
    with db:
        db.execute("UPDATE streams SET busy = '{\"pid\": 1, \"start_time\": 1}'")
    assert any("half done" in v for v in check())
    with db:
        db.execute("UPDATE streams SET busy = NULL")
        db.execute("INSERT INTO ports (port, uid) VALUES (?, ?)", (low + 7, "released-one"))
    assert any("recorded for released-one" in v for v in check())
    with db:
        db.execute("DELETE FROM ports WHERE uid = 'released-one'")
    db.close()
    assert check() == []
    # The relay killed under a live stream: the state no longer matches the processes.
    relay = ProcessIdentity.of(gw.call("status", {"uid": reply["uid"]})["pid"])
    os.kill(relay.pid, signal.SIGKILL)
    while relay.alive():
        time.sleep(0.01)
    found = check()
    assert any("not running" in v for v in found), found
    assert any("not in the relay" in v for v in found), found
    gw.call("release", {"uid": reply["uid"]})
    assert check() == []
