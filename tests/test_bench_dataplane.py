"""bench/dataplane.py runs and writes well-formed results (a tiny run; no speed asserted).

It needs iperf3 (scripts/with-test-env installs it). Ports 16000-16099.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "dataplane.py"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("iperf3") is None,
                                 reason="iperf3 is not installed (apt-get install iperf3)")]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TMPDIR": str(tmp_path)})


def test_dataplane_bench_measures_every_chain_against_direct(gateway_root):
    proc = _run(gateway_root, "--backends", "native,haproxy", "--conns", "1,2", "--rounds", "2",
                "--seconds", "1", "--port-base", "16000", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["errors"] == []
    expected = {"direct", "native tls", "native plain"}
    # Whether haproxy can run is this machine's fact, not the bench's to decide.
    if shutil.which("haproxy", path=os.pathsep.join([os.environ["PATH"], "/usr/sbin", "/sbin"])):
        expected |= {"haproxy tls", "haproxy plain"}
    else:
        assert "haproxy" in result["skipped"]
    if shutil.which("cc"):  # the floor: two minimal C relays, splicing and copying
        expected |= {"floor-splice plain", "floor-copy plain"}
    else:
        assert "cc" in result["skipped"]["floor"]
    assert set(result["results"]) == expected == set(result["chains"])
    direct = result["results"]["direct"]
    for label in expected:
        for n in ("1", "2"):
            cell = result["results"][label][n]
            # two alternating rounds, each a real iperf3 run that moved bytes
            assert len(cell["runs_gbit_s"]) == 2 and min(cell["runs_gbit_s"]) > 0
            assert cell["ratio_to_direct"] == pytest.approx(cell["gbit_s"] / direct[n]["gbit_s"])
            if label != "direct":
                # the proxies of the chain were found and measured while they moved bytes
                assert cell["proxy_cpu_pct"] > 0 and cell["proxy_rss_mib"] > 1
    assert result["chains"]["native tls"]["tls_suite"].startswith("TLSv1.3 TLS_")
    assert result["chains"]["native tls"]["processes"] >= 1
    if "haproxy tls" in expected:
        native = result["results"]["native tls"]["2"]
        haproxy = result["results"]["haproxy tls"]["2"]
        assert result["native_vs"]["tls"]["2"]["haproxy"] == pytest.approx(
            native["gbit_s"] / haproxy["gbit_s"])
    verdicts = {c["target"]: c["verdict"] for c in result["checks"]}
    assert set(verdicts.values()) <= {"met", "not met", "not measured"}
    assert verdicts["64 connections (tls) >= HAProxy"] == "not measured"  # no -P 64 here
    assert verdicts["plain chain >= 0.6x direct (2 conns)"] in ("met", "not met")
    if "floor-copy plain" in expected:
        detail = {c["target"]: c["detail"] for c in result["checks"]}
        assert "two minimal C relays" in detail["plain chain >= 0.6x direct (2 conns)"]

    out = gateway_root / "out"
    assert json.loads((out / "dataplane.json").read_text())["results"] == result["results"]
    table = (out / "dataplane.md").read_text()
    assert "| chain | TLS suite | 1 conn | 2 conns |" in table and "| native tls |" in table
    png = out / "dataplane.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A saved result renders again to the same tables, without running anything.
    again = _run(gateway_root, "--render", str(out / "dataplane.json"), "--out",
                 str(gateway_root / "again"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (gateway_root / "again" / "dataplane.md").read_text() == table


def test_update_readme_replaces_only_between_its_markers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import benchlib

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:dataplane -->\nold\n<!-- /bench:dataplane -->\nrest\n")
    assert benchlib.update_readme("dataplane", "new [m](../../docs/benchmarks.md)\n", readme)
    assert readme.read_text() == ("intro\n<!-- bench:dataplane -->\nnew [m](docs/benchmarks.md)"
                                  "\n<!-- /bench:dataplane -->\nrest\n")
    assert not benchlib.update_readme("controlplane", "x", readme)


def test_dataplane_bench_refuses_an_unknown_backend(tmp_path):
    proc = _run(tmp_path, "--backends", "native,squid")
    assert proc.returncode == 2 and "unknown backends ['squid']" in proc.stderr
