"""``scistream`` without a Prefect server: open, status, renew, list, watch and release call
the gateways directly (no Prefect imported), keep an owner-only record, and the commands
that need Prefect say which extra to install where it is missing."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
import time
import uuid

import pytest

from conftest import run_consumer

# Runs ``scistream`` in a fresh interpreter, then prints (on the real stdout, last line)
# its exit code and the Prefect modules it imported. ``BLOCK`` first makes ``import
# prefect`` fail as on a gateway node installed with the [gateway] extra only.
RUN = """
import json, sys
{block}
from scistream_prefect.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print(json.dumps({{"code": code, "prefect": sorted(m for m in sys.modules
                                                   if m.split(".")[0] == "prefect")}}),
      file=sys.__stdout__)
"""
BLOCK = "sys.modules['prefect'] = None  # what a missing package looks like to an import"


def _env(tmp_path) -> dict:
    """No Prefect server anywhere (environment or profile); a home of the test's own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_PROFILE", "XDG_STATE_HOME")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect-home")}


def scistream(tmp_path, *args: str, gateway_only: bool = False,
              timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    """The command's process, and ``{"code", "prefect"}`` (its exit code, Prefect modules)."""
    code = RUN.format(block=BLOCK if gateway_only else "")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(tmp_path))
    lines = proc.stdout.splitlines()
    seen = json.loads(lines[-1]) if lines and lines[-1].startswith('{"code"') else {}
    proc.stdout = "\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else "")
    return proc, seen


def _record(tmp_path) -> list[dict]:
    path = tmp_path / "home" / ".local" / "state" / "scistream" / "streams.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_help_imports_no_prefect(tmp_path):
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, scistream_prefect\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"],
        capture_output=True, text=True, timeout=120, check=True, env=_env(tmp_path))
    assert imported.stdout.strip() == "[]"
    proc, seen = scistream(tmp_path, "--help")
    assert seen == {"code": 0, "prefect": []}, proc.stderr[-2000:]
    for command in ("open", "renew", "list", "watch"):
        assert command in proc.stdout
    proc, _ = scistream(tmp_path, "open", "--help")
    assert "streams.jsonl" in proc.stdout and "PREFECT_API_URL" in proc.stdout


@pytest.mark.slow
def test_open_status_renew_watch_release_without_a_server(gateways, producer_app, tmp_path):
    producer, consumer = gateways
    prod, cons = str(producer.settings_path), str(consumer.settings_path)
    app = producer_app(2, 8 << 20)
    listeners = sum((["--app-listener", a] for a in app.listeners), [])
    opened, seen = scistream(tmp_path, "open", "--producer", prod, "--consumer", cons,
                             "--num-conn", "2", *listeners, "--json")
    assert seen == {"code": 0, "prefect": []}, opened.stderr[-3000:]  # no temporary server
    handle = json.loads(opened.stdout)
    uid = handle["uid"]
    both = ["--gateway", prod, "--gateway", cons]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "scistream_prefect.cli", "watch", uid, *both, "--interval",
         "0.2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(tmp_path))
    main, sub = pty.openpty()
    on_tty = subprocess.Popen(
        [sys.executable, "-m", "scistream_prefect.cli", "watch", uid, "--gateway", cons,
         "--interval", "0.2"], stdout=sub, stderr=subprocess.PIPE, env=_env(tmp_path))
    os.close(sub)
    try:
        code, received = run_consumer(handle["listeners"])
        assert code == 0 and sum(r["bytes"] for r in received) == 8 << 20

        status, seen = scistream(tmp_path, "status", uid, *both, "--json")
        assert seen == {"code": 0, "prefect": []}, status.stderr[-2000:]
        ends = json.loads(status.stdout)["ends"]
        assert {e["state"] for e in ends.values()} == {"CONNECTED"}
        moved = ends[producer.label]["bytes"]
        assert moved["from_app"] + moved["to_app"] == 8 << 20

        before = time.time()
        renewed, seen = scistream(tmp_path, "renew", uid, *both, "--lease", "7200", "--json")
        assert seen["code"] == 0, renewed.stderr[-2000:]
        expiries = json.loads(renewed.stdout)["lease_expires"]
        assert set(expiries) == {producer.label, consumer.label}
        assert all(before + 7200 <= t <= time.time() + 7200 for t in expiries.values())
        after = json.loads(scistream(tmp_path, "status", uid, *both, "--json")[0].stdout)
        assert {label: e["lease_expires"] for label, e in after["ends"].items()} == expiries
    finally:
        released, seen = scistream(tmp_path, "release", uid, *both)
    assert seen == {"code": 0, "prefect": []}, released.stderr[-2000:]
    assert [gw.call("gateway_info", {})["active_streams"] for gw in gateways] == [0, 0]

    # Both watchers end by themselves once the stream is released, with exit code 0.
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err[-2000:]
    looks = [json.loads(line) for line in out.splitlines()]
    assert looks[0]["uid"] == uid and set(looks[0]["ends"]) == {producer.label, consumer.label}
    assert {e["state"] for e in looks[-1]["ends"].values()} == {"RELEASED"}
    assert max(e["bytes"] or 0 for look in looks for e in look["ends"].values()) == 8 << 20
    assert on_tty.wait(timeout=60) == 0
    shown = b""
    while chunk := _read(main):
        shown += chunk
    os.close(main)
    assert b"\r\x1b[K" in shown and b"RELEASED" in shown  # one line, redrawn in place

    # The record: one line per command that changed the stream, owner-only, no secrets.
    path = tmp_path / "home" / ".local" / "state" / "scistream" / "streams.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    entries = _record(tmp_path)
    assert [(e["command"], e["uid"], e["outcome"]) for e in entries] == [
        ("open", uid, "OK"), ("renew", uid, "OK"), ("release", uid, "OK")]
    assert entries[0]["listeners"] == handle["listeners"]
    assert set(entries[0]) == {"time", "command", "uid", "producer", "consumer", "num_conn",
                               "tls", "listeners", "producer_listeners", "app_listeners",
                               "producer_fingerprint", "consumer_fingerprint", "setup_s",
                               "setup_round_trips", "lease_expires", "outcome"}
    assert entries[0]["setup_round_trips"] == 2
    assert entries[0]["producer_fingerprint"] == handle["producer_fingerprint"]
    assert "CERTIFICATE" not in path.read_text()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side of the pty is closed
        return b""


def test_a_failed_open_is_recorded_with_its_code(gateways, tmp_path):
    producer, consumer = gateways
    opened, seen = scistream(tmp_path, "open", "--producer", str(producer.settings_path),
                             "--consumer", str(consumer.settings_path), "--num-conn", "60",
                             "--app-listener", "127.0.0.1:9")
    assert seen["code"] == 2 and "NO_RESOURCE" in opened.stderr.splitlines()[-1]
    assert "Traceback" not in opened.stderr
    [entry] = _record(tmp_path)
    path = tmp_path / "home" / ".local" / "state" / "scistream" / "streams.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert entry["command"] == "open" and entry["outcome"] == "FAILED"
    assert entry["error"].startswith("NO_RESOURCE: ")
    assert [gw.call("gateway_info", {})["active_streams"] for gw in gateways] == [0, 0]


def test_list_shows_the_callers_streams(gateways, tmp_path):
    producer, consumer = gateways
    prod, cons = str(producer.settings_path), str(consumer.settings_path)
    opened, seen = scistream(tmp_path, "open", "--producer", prod, "--consumer", cons,
                             "--num-conn", "1", "--app-listener", "127.0.0.1:9", "--json")
    assert seen["code"] == 0, opened.stderr[-2000:]
    uid = json.loads(opened.stdout)["uid"]
    try:
        listed, seen = scistream(tmp_path, "list", "--gateway", prod, "--gateway", cons,
                                 "--json")
        assert seen == {"code": 0, "prefect": []}, listed.stderr[-2000:]
        rows = json.loads(listed.stdout)["streams"]
        assert {(r["gateway"], r["uid"], r["role"], r["state"]) for r in rows} == {
            (producer.label, uid, "PROD", "CONNECTED"), (consumer.label, uid, "CONS",
                                                         "CONNECTED")}
        human, _ = scistream(tmp_path, "list", "--gateway", prod)
        assert uid in human.stdout and "CONNECTED" in human.stdout
    finally:
        scistream(tmp_path, "release", uid, "--gateway", prod, "--gateway", cons)


@pytest.mark.parametrize("first", ["", "import scistream_prefect\n"])
def test_prefect_finds_the_block_types_of_the_lazy_package(tmp_path, first):
    """Prefect imports scistream_prefect.blocks (its collection entry point) before it
    looks a block type up by slug: found whether or not the lazy package came first."""
    code = (first + "from prefect.blocks.core import Block\n"
            "print(Block.get_block_class_from_key('scistream-local-gateway').__name__,"
            " Block.get_block_class_from_key('scistream-globus-compute-gateway').__name__)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env=_env(tmp_path))
    assert found.stdout.split() == ["LocalGateway", "GlobusComputeGateway"], found.stderr[-2000:]


def test_a_settings_file_whose_state_dir_is_missing_works(tmp_path):
    """A gateway settings file written by hand, its state directory not made yet."""
    from scistream_gateway.settings import GatewaySettings

    state = tmp_path / "not-yet" / "state"
    settings = tmp_path / "gateway.toml"
    settings.write_text(GatewaySettings(name="by-hand", state_dir=state, port_min=29990,
                                        port_max=29999).to_toml())
    proc, seen = scistream(tmp_path, "status", str(uuid.uuid4()), "--gateway", str(settings))
    assert seen["code"] == 2 and "INVALID_UID" in proc.stderr.splitlines()[-1]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_watch_of_an_unknown_stream_is_invalid_uid(gateways, tmp_path):
    proc, seen = scistream(tmp_path, "watch", str(uuid.uuid4()), "--gateway",
                           str(gateways[0].settings_path))
    assert seen["code"] == 2 and "INVALID_UID" in proc.stderr.splitlines()[-1]


def test_on_a_gateway_node_the_client_commands_name_the_extra(gateways, tmp_path):
    """Without Prefect, what needs it says which extra to install; the rest works."""
    for args in (["demo", "--bytes", "1MiB"], ["whoami"], ["serve"],
                 ["status", str(uuid.uuid4()), "--gateway", "saved-block-name"]):
        proc, seen = scistream(tmp_path, *args, gateway_only=True)
        last = proc.stderr.splitlines()[-1]
        assert seen["code"] == 2, (args, proc.stderr[-2000:])
        assert last.startswith(f"scistream {args[0]}: NOT_IMPLEMENTED: "), last
        assert "pip install 'scistream-prefect[client]'" in last
        assert "Traceback" not in proc.stderr
    proc, seen = scistream(tmp_path, "--help", gateway_only=True)
    assert seen["code"] == 0 and "watch" in proc.stdout
    # A gateway named by its settings file needs no Prefect.
    proc, seen = scistream(tmp_path, "status", str(uuid.uuid4()), "--gateway",
                           str(gateways[0].settings_path), gateway_only=True)
    assert seen["code"] == 2 and "INVALID_UID" in proc.stderr.splitlines()[-1]
    info = gateways[0].call("gateway_info", {})
    assert info["active_streams"] == 0
