"""Detached proxy processes: start with a ready handshake, identify by pid + start time, stop.

A proxy must outlive the gateway function (and the worker) that started it, and a
later call, possibly in another worker process, must be able to tell whether it still
runs and stop it without ever signalling an unrelated process that reused its pid.

It must also outlive the endpoint: ``globus-compute-endpoint enable-on-boot`` makes
the endpoint a systemd service (``Restart=always``, ``KillMode=control-group``), and a
restart of that service kills every process in its cgroup, double-forked or not. So
where systemd manages the machine, a proxy is started in a transient scope unit of its
own (``systemd-run --scope``: the command is exec'd in place, so inherited listening
sockets and the ready pipe survive), outside the endpoint's cgroup. ``SCISTREAM_PROXY_LAUNCH``
chooses: ``auto`` (default: a scope where systemd can make one, else a direct launch),
``systemd`` (a scope or an error, for gateways that must not lose streams), ``direct``.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from scistream_proxy import procfs


__all__ = [
    "LAUNCH_ENV",
    "LaunchPlan",
    "ProcessIdentity",
    "ProxyStartError",
    "launch_plan",
    "scope_command",
    "spawn_detached",
    "survival_report",
    "terminate",
]

LAUNCH_ENV = "SCISTREAM_PROXY_LAUNCH"
LAUNCH_MODES = ("auto", "systemd", "direct")


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
        stat = procfs.stat(self.pid)
        return stat is not None and stat[0] != "Z" and int(stat[19]) == self.start_time


def _start_time(pid: int) -> int | None:
    stat = procfs.stat(pid)
    return None if stat is None else int(stat[19])


@dataclass(frozen=True)
class LaunchPlan:
    """How proxies get started here: ``mode`` is ``"systemd"`` (a transient scope per
    proxy) or ``"direct"``; ``reason`` says why a scope is not used (None if it is);
    ``user`` is True for the per-user systemd manager (``systemd-run --user``)."""

    mode: str
    reason: str | None = None
    user: bool = False
    env: dict | None = None  # extra environment systemd-run needs (XDG_RUNTIME_DIR)
    required: bool = False  # SCISTREAM_PROXY_LAUNCH=systemd: no fallback
    systemd_run: str = "systemd-run"


def _runtime_dir() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")


def launch_plan(environ: dict | None = None, systemd_root: Path = Path("/run/systemd/system"),
                systemd_run: str | None = None) -> LaunchPlan:
    """Decide how to launch proxies on this machine, from ``SCISTREAM_PROXY_LAUNCH`` and
    what is present: systemd as the service manager (``/run/systemd/system``, as
    ``sd_booted()`` checks), ``systemd-run``, and for a non-root user a reachable user
    manager (``loginctl enable-linger`` keeps one running without a login session)."""
    environ = os.environ if environ is None else environ
    wanted = environ.get(LAUNCH_ENV, "auto").strip().lower() or "auto"
    if wanted not in LAUNCH_MODES:
        wanted = "auto"
    if wanted == "direct":
        return LaunchPlan("direct", f"{LAUNCH_ENV}=direct")
    required = wanted == "systemd"
    binary = systemd_run or shutil.which("systemd-run")
    reason = None
    user = os.getuid() != 0
    env = None
    if binary is None:
        reason = "systemd-run is not installed"
    elif not systemd_root.is_dir():
        reason = f"systemd is not the service manager here ({systemd_root} is missing)"
    elif user:
        runtime = _runtime_dir()
        if not (runtime / "systemd" / "private").exists() and not (runtime / "bus").exists():
            reason = (f"no systemd user manager for uid {os.getuid()} ({runtime}); "
                      "run `loginctl enable-linger` for this user")
        else:
            env = {"XDG_RUNTIME_DIR": str(runtime)}
    if reason is not None:
        return LaunchPlan("direct", reason, required=required)
    return LaunchPlan("systemd", None, user=user, env=env, required=required,
                      systemd_run=binary)


def scope_command(argv: list[str], *, user: bool, description: str,
                  systemd_run: str = "systemd-run") -> list[str]:
    """The command that runs ``argv`` in a transient scope unit of its own.

    ``--scope`` execs ``argv`` in place (so inherited descriptors reach it) after moving
    it into a new scope, outside the caller's cgroup; systemd names the unit, so two
    gateways never collide on a name. ``--collect`` unloads the unit even if the proxy
    failed, so stopped proxies leave nothing in systemd either.
    """
    return [
        systemd_run, *(["--user"] if user else []), "--scope", "--quiet", "--collect",
        f"--description={description}", "--", *argv,
    ]


def _cgroup() -> str:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return ""


def survival_report(plan: LaunchPlan | None = None, cgroup: str | None = None) -> dict:
    """Whether proxies started from this process would survive a restart of the service
    this process runs in, with a warning for the operator when they would not."""
    plan = plan or launch_plan()
    cgroup = _cgroup() if cgroup is None else cgroup
    services = [part for part in cgroup.split("/") if part.endswith(".service")
                and not part.startswith("user@")]
    report = {"launch": "systemd-scope" if plan.mode == "systemd" else "direct",
              "reason": plan.reason, "cgroup": cgroup or None,
              "survives_endpoint_restart": True, "warning": None}
    if plan.required and plan.mode != "systemd":
        report["survives_endpoint_restart"] = False
        report["warning"] = (f"{LAUNCH_ENV}=systemd but no systemd scope can be made here "
                             f"({plan.reason}): every reserve will fail")
    elif plan.mode == "direct" and services:
        report["survives_endpoint_restart"] = False
        report["warning"] = (
            f"proxies are started inside the cgroup of {services[-1]} ({plan.reason}): "
            "a restart or stop of that unit kills every stream's proxy. Install the "
            "drop-in from endpoint_configs/systemd/ and make systemd-run usable here."
        )
    return report


def spawn_detached(
    argv: list[str], *, cwd: Path, log_path: Path, pass_fds: tuple[int, ...] = (),
    ready_timeout_s: float = 10.0, plan: LaunchPlan | None = None, env: dict | None = None,
) -> ProcessIdentity:
    """Start ``argv`` (which must fork away and report on ``--ready-fd``) and wait until ready.

    The program gets ``--ready-fd N`` appended; it writes one JSON line, ``{"pid": P}``
    when it is listening or ``{"error": "..."}``. Returns the identity of the process
    that reported. Its own session, no stdin, output to ``log_path`` (mode 0600).
    Where systemd is usable (see :func:`launch_plan`) it runs in a transient scope unit;
    if making the scope fails and ``SCISTREAM_PROXY_LAUNCH`` is not ``systemd``, it is
    started directly instead, with a note in ``log_path``. ``env`` adds to (or
    overrides) the environment the program inherits.
    """
    plan = plan or launch_plan()
    if plan.required and plan.mode != "systemd":
        raise ProxyStartError(f"{LAUNCH_ENV}=systemd, but no systemd scope can be made "
                              f"here: {plan.reason}")
    if plan.mode == "systemd":
        try:
            return _spawn(argv, cwd=cwd, log_path=log_path, pass_fds=pass_fds,
                          ready_timeout_s=ready_timeout_s, plan=plan, env=env)
        except _ScopeFailed as exc:
            if plan.required:
                raise ProxyStartError(
                    f"systemd-run could not start the proxy in a scope ({exc}); "
                    f"{LAUNCH_ENV}=systemd forbids a direct launch") from None
            with open(log_path, "a") as log:
                log.write(f"scistream: systemd scope failed ({exc}); starting directly\n")
    return _spawn(argv, cwd=cwd, log_path=log_path, pass_fds=pass_fds,
                  ready_timeout_s=ready_timeout_s, plan=None, env=env)


class _ScopeFailed(Exception):
    """systemd-run exited without the proxy ever reporting."""


def _spawn(
    argv: list[str], *, cwd: Path, log_path: Path, pass_fds: tuple[int, ...],
    ready_timeout_s: float, plan: LaunchPlan | None, env: dict | None = None,
) -> ProcessIdentity:
    read_fd, write_fd = os.pipe()
    command = [*argv, "--ready-fd", str(write_fd)]
    extra = {**(env or {})}
    if plan is not None:
        command = scope_command(command, user=plan.user, description=f"scistream proxy {cwd}",
                                systemd_run=plan.systemd_run)
        extra.update(plan.env or {})
    env = {**os.environ, **extra} if extra else None
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        starter = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
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
        code = starter.returncode
        if message is None and code not in (0, None, -signal.SIGKILL):
            # It exited with an error before anything reported: with a scope, systemd-run
            # itself most likely failed (no bus, no permission); its words are in the log.
            if plan is not None:
                raise _ScopeFailed(f"systemd-run or the proxy exited with {code} before "
                                   "reporting ready")
            raise ProxyStartError(f"proxy exited with {code} before reporting ready "
                                  f"(see {log_path.name})")
        if message is None:
            raise ProxyStartError(f"proxy did not report ready within {ready_timeout_s} s")
        raise ProxyStartError(str(message["error"]))
    identity = ProcessIdentity.of(int(message["pid"]))
    if identity is None:
        raise ProxyStartError("proxy reported ready and exited")
    return identity


def readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout_s``. ``poll``, not ``select``:
    a process with many sockets open (a gateway worker, a test with hundreds of
    streams) has descriptors above select's limit of 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


def _read_line(fd: int, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not readable(fd, remaining):
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
