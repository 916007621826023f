"""Stopping a proxy stops only processes that are the stream's: its recorded identity
(pid + start time) *and* working in the stream's directory. A process with the proxy's
name, session and identity that works elsewhere survives."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from scistream_proxy.external import NginxBackend
from scistream_proxy.process import ProcessIdentity


def _decoy(cwd: Path) -> tuple[subprocess.Popen, ProcessIdentity, ProcessIdentity]:
    """A session named like nginx: a leader and a later child ("worker"), both in
    ``cwd``. Returns the leader's Popen and the identities of leader and child."""
    proc = subprocess.Popen(
        ["bash", "-c", "exec -a 'nginx: worker process' sleep 60 & echo $!; "
                       "exec -a 'nginx: master process' sleep 60"],
        cwd=cwd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes()[:5] != b"nginx":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    leader, worker = ProcessIdentity.of(proc.pid), ProcessIdentity.of(child)
    assert leader is not None and worker is not None
    return proc, leader, worker


@pytest.mark.parametrize("works_in_stream_dir", [False, True], ids=["elsewhere", "in-stream-dir"])
def test_stop_spares_a_process_that_does_not_work_in_the_stream_dir(tmp_path,
                                                                     works_in_stream_dir):
    stream_dir, elsewhere = tmp_path / "stream", tmp_path / "elsewhere"
    stream_dir.mkdir()
    elsewhere.mkdir()
    proc, leader, worker = _decoy(stream_dir if works_in_stream_dir else elsewhere)
    # A record that names the decoy exactly (pid, start time, session): what a stale
    # record after a reboot could name.
    handle = {"pid": leader.pid, "start_time": leader.start_time,
              "sid": os.getsid(leader.pid), "holder": None}
    try:
        NginxBackend().stop(handle, stream_dir)
        if works_in_stream_dir:
            proc.wait(timeout=10)
            assert not worker.alive()
        else:
            assert leader.alive() and worker.alive()
    finally:
        for identity in (worker, leader):
            if identity.alive():
                os.kill(identity.pid, 9)
        proc.wait(timeout=10)


@pytest.mark.parametrize("works_in_relay_dir", [False, True], ids=["elsewhere", "in-relay-dir"])
def test_native_stop_spares_a_process_that_does_not_work_in_the_relay_dir(tmp_path,
                                                                          works_in_relay_dir):
    """A native stream's handle names its relay; with no relay answering (wedged), the
    stop signals the recorded process only if it works in the gateway's relay directory."""
    from scistream_proxy.native_backend import NativeBackend

    stream_dir, relay_dir, elsewhere = tmp_path / "streams" / "s1", tmp_path / "relay", \
        tmp_path / "elsewhere"
    for directory in (stream_dir, relay_dir, elsewhere):
        directory.mkdir(parents=True, mode=0o700)
    proc = subprocess.Popen(["sleep", "60"], cwd=relay_dir if works_in_relay_dir else elsewhere)
    try:
        identity = None
        while identity is None:
            identity = ProcessIdentity.of(proc.pid)
        NativeBackend().stop({"pid": identity.pid, "start_time": identity.start_time},
                             stream_dir)
        if works_in_relay_dir:
            proc.wait(timeout=10)
        else:
            assert identity.alive()
    finally:
        proc.kill()
        proc.wait(timeout=10)
