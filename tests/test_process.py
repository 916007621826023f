"""Detached proxy processes: the ready handshake, identity by start time, safe stops."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from scistream_proxy.process import ProcessIdentity, ProxyStartError, spawn_detached, terminate

# A daemon that forks away like the real one and then never reports ready.
HANGS = "import os, time; os.fork() and os._exit(0); time.sleep(600)  # scistream-hang-test"


def _pids_running(marker: str) -> list[int]:
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_daemon_that_never_reports_ready_is_killed(tmp_path):
    with pytest.raises(ProxyStartError, match="did not report ready"):
        spawn_detached([sys.executable, "-c", HANGS], cwd=tmp_path,
                       log_path=tmp_path / "log", ready_timeout_s=1.0)
    deadline = time.monotonic() + 5
    while _pids_running("scistream-hang-test") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_running("scistream-hang-test") == []


def test_a_daemon_that_reports_an_error_is_an_error(tmp_path):
    program = ("import os, sys; fd = int(sys.argv[-1]); "
               "os.write(fd, b'{\"error\": \"no such key file\"}\\n')")
    with pytest.raises(ProxyStartError, match="no such key file"):
        spawn_detached([sys.executable, "-c", program], cwd=tmp_path,
                       log_path=tmp_path / "log")


def test_a_reused_pid_is_never_signalled():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        real = ProcessIdentity.of(sleeper.pid)
        assert real is not None and real.alive()
        # The same pid with another start time is another process: not ours to stop.
        impostor = ProcessIdentity(sleeper.pid, real.start_time + 1)
        assert not impostor.alive()
        terminate(impostor, grace_s=0.1)
        assert sleeper.poll() is None
        terminate(real, grace_s=0.1)
        assert sleeper.wait(timeout=5) == -15  # SIGTERM came first
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
