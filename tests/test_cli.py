"""The ``scistream`` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scistream_prefect.cli import build_parser, parse_size


@pytest.mark.slow
def test_demo_json_streams_for_real_and_leaves_nothing(tmp_path):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "scistream_prefect.cli", "demo", "--json", "--bytes", "96MiB",
         "--num-conn", "3", "--port-base", "30600"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout holds exactly one JSON object
    assert summary["checksum_ok"] is True and summary["clean"] is True
    assert summary["bytes"] == 96 * 2**20 and summary["num_conn"] == 3 and summary["tls"] is True
    assert summary["leaked_processes"] == summary["held_ports"] == 0
    assert summary["active_streams"] == summary["leftover_stream_dirs"] == 0
    assert 0 < summary["setup_s"] < 60 and summary["throughput_gbit_s"] > 0
    # Both proxies counted every byte.
    assert [b["from_app"] + b["to_app"] for b in summary["proxy_bytes"]] == [96 * 2**20] * 2


def test_help_describes_the_demo():
    text = build_parser().format_help()
    assert "demo" in text
    proc = subprocess.run([sys.executable, "-m", "scistream_prefect.cli", "demo", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--no-tls" in proc.stdout and "--json" in proc.stdout


@pytest.mark.parametrize("text, value", [
    ("1GiB", 2**30), ("256MiB", 256 * 2**20), ("500MB", 500 * 10**6), ("123", 123),
    ("1.5GiB", int(1.5 * 2**30)),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "1 parsec", "-5", "1e9"])
def test_parse_size_refuses_nonsense(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--num-conn", "0"], ["--num-conn", "many"],
                                  ["--port-base", "65500"], ["--bytes", "lots"]])
def test_demo_refuses_bad_arguments_without_a_traceback(args):
    proc = subprocess.run([sys.executable, "-m", "scistream_prefect.cli", "demo", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "usage:" in proc.stderr


@pytest.mark.slow
def test_demo_reports_a_gateway_error_with_its_code(tmp_path):
    """Every port of the producer gateway's range is taken: NO_RESOURCE, exit 2."""
    import socket

    base = 30300
    held = []
    for port in range(base, base + 100):
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        held.append(sock)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "scistream_prefect.cli", "demo", "--bytes", "1MiB",
             "--port-base", str(base)],
            capture_output=True, text=True, timeout=300, env=env,
        )
    finally:
        for sock in held:
            sock.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    # Our verdict is one line (Prefect's server may still log its shutdown after it).
    verdict = "scistream demo: NO_RESOURCE: port range 30300-30399 on 127.0.0.1 exhausted"
    assert any(line.startswith(verdict) for line in proc.stderr.splitlines()), proc.stderr[-2000:]


# open's and renew's arguments, and the open logic's type that bounds each.
BOUNDED = [("open", "--num-conn", "NumConn"), ("open", "--rate", "Rate"),
           ("open", "--lease", "LeaseS"), ("open", "--hello-timeout", "WaitS"),
           ("renew", "--lease", "LeaseS")]


def _bounds(kind: str) -> tuple[float, float]:
    from scistream_prefect import streams_core as core

    rules = [rule for field in getattr(core, kind).__metadata__
             for rule in getattr(field, "metadata", ())]
    return (next(r.ge for r in rules if hasattr(r, "ge")),
            next(r.le for r in rules if hasattr(r, "le")))


@pytest.mark.parametrize("command, option, kind", BOUNDED)
def test_help_states_the_flows_bounds_and_the_parser_holds_to_them(capsys, command, option,
                                                                   kind):
    """The help says the bounds the flow parameters carry (streams_core), not numbers of
    its own; a value past either is BAD_FORMAT's usage error, one inside is taken."""
    low, high = _bounds(kind)
    text_low, text_high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"{text_low} to {text_high}" in shown
    base = (["open", "--producer", "p", "--consumer", "c"] if command == "open"
            else ["renew", "0b5c4a1e-5f8a-4c1e-9d43-2f1f6ad2c7a1", "--gateway", "g"])
    for outside in (low - 1, high + 1):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, option, str(outside)])
        assert f"is not in [{text_low}, {text_high}]" in capsys.readouterr().err
    dest = option.lstrip("-").replace("-", "_")
    assert getattr(parser.parse_args([*base, option, str(high)]), dest) == high
