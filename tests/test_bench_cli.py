"""bench/cli.py runs and writes well-formed results (one round; no time asserted).
Ports 16500-16527."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).parent.parent / "bench" / "cli.py"


def test_cli_bench_times_every_command_as_a_process(tmp_path):
    from scistream_gateway.protocol import FUNCTIONS

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--runs", "2", "--num-conn", "2", "--port-base", "16500",
         "--out", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads((tmp_path / "out" / "cli.json").read_text()) == result
    table = (tmp_path / "out" / "cli.md").read_text()
    assert result["leftover_pids"] == []
    for name, row in result["commands"].items():
        assert f"`{name}`" in table
        if name == "scistream list" and "list_streams" not in FUNCTIONS:
            assert row["n"] == 0 and result["skipped"]
            continue
        assert row["n"] == 2 and 0 < row["min"] <= row["p50"] <= row["p95"] <= row["max"]
        assert row["cpu_p50"] > 0
    assert result["commands"]["scistream status"]["goal_p50"] == 0.4
