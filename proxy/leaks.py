"""Checks that a released stream left nothing behind on this host: ports, proxies."""

from __future__ import annotations

import socket
from pathlib import Path

from scistream_proxy import procfs
from scistream_proxy.addresses import parse_address

__all__ = ["port_is_free", "proxy_pids", "runs_a_proxy", "working_dirs"]


def port_is_free(address: str) -> bool:
    """Whether ``host:port`` can be bound again (as a server would, with SO_REUSEADDR)."""
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_DAEMON = b"scistream_proxy.native_daemon"


def runs_a_proxy(pid: int) -> bool:
    """Whether ``pid`` is (still) a native proxy daemon."""
    return _DAEMON in procfs.cmdline(pid)


def working_dirs(under: Path) -> dict[int, str]:
    """Pids of processes working in ``under`` or a directory below it, with that
    directory (also when it was deleted since: the kernel then appends " (deleted)",
    dropped here). Port holders, stunnel, HAProxy and nginx work in their stream's
    directory, so this finds them with or without a record of them."""
    top = str(under).rstrip("/")
    found = {}
    for pid in procfs.pids():
        cwd = procfs.cwd(pid).removesuffix(" (deleted)")
        if cwd == top or cwd.startswith(top + "/"):
            found[pid] = cwd
    return found


def proxy_pids(under: Path | None = None) -> list[int]:
    """Pids of native proxy daemons, optionally only those whose stream directory is
    below ``under``; with ``under``, also every process working in a directory below it
    (port holders, stunnel, HAProxy, nginx and its workers run in their stream's
    directory, even after it was deleted)."""
    prefix = str(under).encode() if under is not None else b""
    pids = []
    for pid in procfs.pids():
        argv = procfs.cmdline(pid)
        if _DAEMON in argv and any(arg.startswith(prefix) for arg in argv[1:]):
            pids.append(pid)
        elif under is not None and procfs.cwd(pid).startswith(str(under) + "/"):
            pids.append(pid)
    return pids
