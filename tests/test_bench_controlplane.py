"""bench/controlplane.py runs and writes well-formed results (a tiny run, in this
process under the suite's Prefect harness; no time asserted). Ports 16200-16299."""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH_DIR = Path(__file__).parent.parent / "bench"


@pytest.fixture
def controlplane(monkeypatch, gateway_root):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    monkeypatch.setattr(tempfile, "tempdir", str(gateway_root))  # leak check covers it
    return importlib.import_module("controlplane")


def test_controlplane_bench_counts_round_trips_and_measures(controlplane, gateway_root):
    from scistream_prefect import LocalGateway

    seam = LocalGateway.call
    out = gateway_root / "out"
    assert controlplane.main(["--open-runs", "3", "--session-runs", "2", "--flow-runs", "1",
                              "--concurrent", "2,4", "--workers", "2", "--port-base", "16200",
                              "--out", str(out)]) == 0
    assert LocalGateway.call is seam  # the recorder put the seam back
    result = json.loads((out / "controlplane.json").read_text())
    timings = result["timings"]
    assert timings["open, direct calls (reserve to both listening)"]["n"] == 3
    assert timings["stream_session open inside a flow (until the block runs)"]["n"] == 2
    assert timings["open_stream flow run (wall)"]["n"] == 1
    for dist in timings.values():
        assert 0 < dist["min"] <= dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]
    trips = result["round_trips"]
    # Measured at the seam; the protocol's shape is reserve ‖ reserve, hello, connect ‖ connect.
    for operation in ("open (direct calls)", "stream_session open (tasks in a flow)",
                      "open_stream flow run"):
        assert sum(trips[operation]["round_trips"].values()) >= 1
        sequences = trips[operation]["sequences"]
        if operation == "open (direct calls)":
            assert "reserve ‖ reserve → hello → connect ‖ connect" in sequences
        else:  # Prefect tasks submitted together need not overlap on a loaded machine
            assert {s.replace("‖", "→") for s in sequences} == \
                {"reserve → reserve → hello → connect → connect"}, sequences
    assert {s.replace("‖", "→") for s in trips["release_stream flow run"]["sequences"]} == \
        {"release → release"}
    for count in ("2", "4"):
        many = result["concurrent"][count]
        assert many["opened"] == int(count) and many["error_count"] == 0
        assert many["setup_s"]["n"] == int(count)
        assert many["memory"]["rss_kib"] > 0 and many["memory"]["processes"] >= 2
    verdicts = {c["target"]: c["verdict"] for c in result["checks"]}
    assert set(verdicts.values()) <= {"met", "not met"}
    table = (out / "controlplane.md").read_text()
    assert "| measure | n | p50 | p90 | p99 | min | max |" in table
    assert "Sequential remote round trips" in table


def test_round_trips_group_overlapping_calls(controlplane):
    calls = [(0.0, 1.0, "reserve"), (0.1, 1.2, "reserve"), (1.3, 1.4, "hello"),
             (1.5, 2.0, "connect"), (1.9, 2.2, "connect"), (2.3, 2.4, "status")]
    groups = controlplane.round_trips(calls)
    assert groups == [["reserve", "reserve"], ["hello"], ["connect", "connect"], ["status"]]
    assert controlplane.sequence(groups) == \
        "reserve ‖ reserve → hello → connect ‖ connect → status"
