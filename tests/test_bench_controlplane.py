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
                              "--added-delay-ms", "20", "--out", str(out)]) == 0
    assert LocalGateway.call is seam  # the recorder put the seam back
    result = json.loads((out / "controlplane.json").read_text())
    assert result["config"]["added_delay_ms"] == 20
    folded, separate = controlplane.OPENS[True], controlplane.OPENS[False]
    timings = result["timings"]
    for name in (folded, separate):
        assert timings[f"{name}: setup_s (first reserve to both listening)"]["n"] == 3
    assert timings["stream_session open inside a flow (until the block runs)"]["n"] == 2
    assert timings["open_stream flow run (wall)"]["n"] == 1
    for dist in timings.values():
        assert 0 < dist["min"] <= dist["p50"] <= dist["p90"] <= dist["p95"] <= dist["p99"] \
            <= dist["max"]
    # Each sequential round trip waited the added 20 ms at least (a sleep, not a speed).
    paths = result["setup_paths"]
    assert paths[folded]["setup_round_trips"] == [2]
    assert paths[separate]["setup_round_trips"] == [3]
    assert paths[folded]["setup_s"]["min"] >= 2 * 0.020
    assert paths[separate]["setup_s"]["min"] >= 3 * 0.020
    trips = result["round_trips"]
    # Measured at the seam: the hello rides on the producer's connect.
    for operation in (folded, separate, "stream_session open (tasks in a flow)",
                      "open_stream flow run"):
        assert sum(trips[operation]["round_trips"].values()) >= 1
    assert "reserve ‖ reserve → connect ‖ connect" in trips[folded]["sequences"]
    assert "reserve ‖ reserve → hello ‖ wait_hello → connect ‖ connect" in \
        trips[separate]["sequences"]
    for operation in (folded, "stream_session open (tasks in a flow)",
                      "open_stream flow run"):
        # Prefect tasks submitted together need not overlap on a loaded machine
        assert {s.replace("‖", "→") for s in trips[operation]["sequences"]} == \
            {"reserve → reserve → connect → connect"}, trips[operation]
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
    assert "| measure | n | p50 | p90 | p95 | p99 | min | max |" in table
    assert "Sequential remote round trips" in table
    assert "| path | round trips | n | setup p50 | setup p95 |" in table


def test_round_trips_group_overlapping_calls(controlplane):
    calls = [(0.0, 1.0, "reserve"), (0.1, 1.2, "reserve"), (1.3, 1.4, "hello"),
             (1.5, 2.0, "connect"), (1.9, 2.2, "connect"), (2.3, 2.4, "status")]
    groups = controlplane.round_trips(calls)
    assert groups == [["reserve", "reserve"], ["hello"], ["connect", "connect"], ["status"]]
    assert controlplane.sequence(groups) == \
        "reserve ‖ reserve → hello → connect ‖ connect → status"


def test_the_world_mode_needs_root_and_renders_a_saved_result(controlplane, monkeypatch,
                                                               tmp_path, capsys):
    """--world refuses a non-root user with a clear error, before building anything;
    a saved world result renders to its tables."""
    import os

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit):
        controlplane.main(["--world", "--out", str(tmp_path)])
    assert "run it as root" in capsys.readouterr().err
    saved = BENCH_DIR / "results" / "controlplane-world.json"
    assert controlplane.main(["--render", str(saved), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "controlplane-world.md").read_text()
    assert "| added ms per request | round trips |" in table and "× direct" in table
