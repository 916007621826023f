"""The LocalGateway seam: serializer round trip, worker processes, failures mapped to codes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from scistream_prefect import Timeout, Unavailable
from scistream_prefect.gateways import _POOLS

from conftest import make_gateway


def _workers(gw) -> list:
    pool = _POOLS[(os.getpid(), str(gw.settings_path), gw.workers)]
    return list(pool.idle)


def test_a_call_that_outlives_its_timeout_is_killed_and_the_gateway_recovers(gateway_root):
    gw = make_gateway(gateway_root, "slow-gw")
    gw.call("gateway_info", {})
    with pytest.raises(Timeout, match="did not finish"):
        # wait_hello on an unknown uid fails fast, so use a long-poll on a real stream.
        from test_gateway_functions import reserve

        uid, _, _ = reserve(gw)
        try:
            gw.call("wait_hello", {"uid": uid, "timeout_s": 5}, timeout_s=0.5)
        finally:
            gw.call("release", {"uid": uid})
    assert gw.call("gateway_info", {})["active_streams"] == 0


def test_a_worker_that_dies_is_unavailable_then_replaced(gateway_root):
    gw = make_gateway(gateway_root, "fragile-gw", size=4)
    gw.warm_up()
    for worker in _workers(gw):
        worker.proc.kill()
        worker.proc.wait()
    with pytest.raises(Unavailable, match="died"):
        gw.call("gateway_info", {})
    # The dead workers are dropped as they are found; fresh ones take over.
    for _ in range(gw.workers):
        try:
            gw.call("gateway_info", {})
        except Unavailable:
            pass
    assert gw.call("gateway_info", {})["name"] == "fragile-gw"


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
    # Data the serializer carries but JSON would not is still refused by the gateway.
    with pytest.raises(BadFormat, match="uid"):
        gw.call("status", {"uid": {"not", "a", "string"}})
