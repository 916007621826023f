"""The benchmark stays runnable (a tiny run; no figure is asserted, only that it measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).parent.parent / "bench" / "setup_and_throughput.py"


def test_setup_and_throughput_bench_runs(tmp_path):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--streams", "3", "--rounds", "1", "--bytes", "8MiB",
         "--num-conn", "2", "--port-base", "30000", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["setup_s"]["n"] == 3 and result["setup_s"]["p50"] > 0
    throughput = result["throughput_gbit_s"]
    assert len(throughput["direct_runs"]) == len(throughput["tls_chain_runs"]) == 1
    assert throughput["direct"] > 0 and throughput["tls_chain"] > 0
