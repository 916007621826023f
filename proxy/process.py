"""Detached proxy processes: start with a ready handshake, identify by pid + start time, stop.

A proxy must outlive the gateway function (and the worker) that started it, and a
later call, possibly in another worker process, must be able to tell whether it still
runs and stop it without ever signalling an unrelated process that reused its pid.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessIdentity", "ProxyStartError", "spawn_detached", "terminate"]


class ProxyStartError(RuntimeError):
    """The proxy did not report ready (its own reason, or a timeout)."""


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as recorded in gateway state: pid plus kernel start time (clock ticks)."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        start = _start_time(pid)
        return None if start is None else cls(pid, start)

    def alive(self) -> bool:
        """True while this very process runs (not a zombie, not a reused pid)."""
        stat = _stat(self.pid)
        return stat is not None and stat[0] != "Z" and int(stat[19]) == self.start_time


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else int(stat[19])


def spawn_detached(
    argv: list[str], *, cwd: Path, log_path: Path, pass_fds: tuple[int, ...] = (),
    ready_timeout_s: float = 10.0,
) -> ProcessIdentity:
    """Start ``argv`` (which must fork away and report on ``--ready-fd``) and wait until ready.

    The program gets ``--ready-fd N`` appended; it writes one JSON line, ``{"pid": P}``
    when it is listening or ``{"error": "..."}``. Returns the identity of the process
    that reported. Its own session, no stdin, output to ``log_path`` (mode 0600).
    """
    read_fd, write_fd = os.pipe()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        starter = subprocess.Popen(
            [*argv, "--ready-fd", str(write_fd)],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=(*pass_fds, write_fd),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
        os.close(log_fd)
    try:
        message = _read_line(read_fd, ready_timeout_s)
    finally:
        os.close(read_fd)
        # The starter forks the daemon and exits at once; reap it so no zombie stays.
        try:
            starter.wait(timeout=ready_timeout_s)
        except subprocess.TimeoutExpired:
            starter.kill()
            starter.wait()
    if message is None or "error" in message:
        # The daemon forked from the starter keeps its process group (named by the
        # starter's pid, which Linux does not reuse while the group has members), so
        # this reaches a daemon that hangs before reporting, and nothing else.
        try:
            os.killpg(starter.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if message is None:
            raise ProxyStartError(f"proxy did not report ready within {ready_timeout_s} s")
        raise ProxyStartError(str(message["error"]))
    identity = ProcessIdentity.of(int(message["pid"]))
    if identity is None:
        raise ProxyStartError("proxy reported ready and exited")
    return identity


def _read_line(fd: int, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return None


def terminate(identity: ProcessIdentity, grace_s: float = 2.0) -> None:
    """Wait up to ``grace_s`` for the process to leave, then SIGTERM, then SIGKILL.

    Never signals a pid whose start time differs from the recorded one.
    """
    if _wait_gone(identity, grace_s):
        return
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return
    try:
        # The pidfd pins the process: if the start time still matches now, every
        # signal below reaches the recorded process even if it exits meanwhile.
        if not identity.alive():
            return
        for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 2.0)):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return
            if _wait_gone(identity, wait):
                return
    finally:
        os.close(pidfd)


def _wait_gone(identity: ProcessIdentity, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while identity.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True
