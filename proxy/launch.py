"""Launcher of a foreground proxy (stunnel, HAProxy, nginx) with a ready handshake.

``spawn_detached`` starts this module; it forks, and the child puts the inherited
listening sockets at descriptors 3, 4, ... and execs the proxy, which stays in the
foreground (it never daemonizes, so the pid reported is the pid that runs). The
parent watches the proxy until it is ready, reports ``{"pid": P}`` (or the reason it
failed, with the end of its log) on the ready pipe, and exits. "Ready" is observed,
never slept on:

``epoll``  every listening socket is registered in an epoll instance of the proxy or
           of one of its worker processes (``/proc/<pid>/fdinfo``): its event loop
           accepts (HAProxy, nginx);
``log``    the proxy logged the line that follows its setup, and still runs (stunnel,
           which polls with poll(2) and has no control socket).

The launch spec is a JSON file in the stream's 0700 directory: ``argv``, ``env``,
``listen_fds`` (descriptors inherited by the launcher), ``listen_pid_env`` (set
``LISTEN_PID``/``LISTEN_FDS`` as systemd socket activation does), ``ready``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from scistream_proxy.daemon import ready_reporter

FD_BASE = 3


def _socket_inode(fd: int) -> str:
    return f"socket:[{os.fstat(fd).st_ino}]"


def _family(pid: int) -> list[int]:
    """The pid and its descendants (nginx's workers are children of its master)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                text = Path(f"/proc/{current}/task/{task}/children").read_text()
                todo.extend(int(c) for c in text.split())
        except OSError:
            continue
    return found


def polled_inodes(pid: int) -> set[str]:
    """Inodes of the sockets registered in any epoll instance of ``pid``'s family."""
    inodes: set[str] = set()
    for member in _family(pid):
        try:
            fds = os.listdir(f"/proc/{member}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                info = Path(f"/proc/{member}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("tfd:"):
                    try:
                        inodes.add(os.readlink(f"/proc/{member}/fd/{line.split()[1]}"))
                    except OSError:
                        pass
    return inodes


def _tail(path: Path, offset: int, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return text[-limit:].strip()


def _exec_child(spec: dict, ready_fd: int) -> None:
    """In the forked child: descriptors in place, environment set, exec the proxy."""
    try:
        os.close(ready_fd)
        os.umask(0o077)  # what the proxy creates (pid file, stats socket) is private too
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in spec["listen_fds"]]
        for index, fd in enumerate(high):
            os.dup2(fd, FD_BASE + index, inheritable=True)
            os.close(fd)
        env = dict(spec["env"])
        if spec.get("listen_pid_env"):
            env["LISTEN_PID"] = str(os.getpid())  # the pid that exec keeps
            env["LISTEN_FDS"] = str(len(high))
        os.execve(spec["argv"][0], spec["argv"], env)
    except BaseException as exc:  # noqa: BLE001 - nothing else can report from here
        print(f"launch: could not exec {spec['argv'][0]}: {exc}", file=sys.stderr, flush=True)
    os._exit(127)


def wait_ready(pid: int, spec: dict, inodes: list[str], log: Path, log_offset: int,
               timeout_s: float) -> str | None:
    """None once the proxy is ready, else why it is not (it exited)."""
    ready = spec["ready"]
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return f"exited with status {code}: {_tail(log, log_offset)}"
        if ready["kind"] == "epoll":
            if set(inodes) <= polled_inodes(pid):
                return None
        elif ready["pattern"] in _tail(log, log_offset, limit=1 << 20):
            return None
        if time.monotonic() >= deadline:
            return f"not ready within {timeout_s} s: {_tail(log, log_offset)}"
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scistream_proxy.launch",
        description="Start one stream's foreground proxy and report when it is ready "
        "(started by a gateway, not by hand).",
    )
    parser.add_argument("--spec", required=True, type=Path, help="launch spec (JSON)")
    parser.add_argument("--log", required=True, type=Path, help="the proxy's log file")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)

    report = ready_reporter(args.ready_fd)

    try:
        spec = json.loads(args.spec.read_text())
        inodes = [_socket_inode(fd) for fd in spec["listen_fds"]]
        log_offset = args.log.stat().st_size
    except Exception as exc:  # noqa: BLE001 - the gateway gets the reason
        report({"error": f"bad launch spec: {type(exc).__name__}: {exc}"})
        return 1
    pid = os.fork()
    if pid == 0:
        _exec_child(spec, args.ready_fd)
    for fd in spec["listen_fds"]:
        os.close(fd)  # only the proxy holds the sockets now
    problem = wait_ready(pid, spec, inodes, args.log, log_offset, args.timeout)
    if problem is None:
        report({"pid": pid})
        return 0
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    report({"error": f"{Path(spec['argv'][0]).name} {problem}"})
    return 1


if __name__ == "__main__":
    sys.exit(main())
