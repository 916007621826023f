"""The S2DS backend interface and its registry; ``native`` is the default backend.

A gateway drives every backend through the same four steps, all keyed by the stream's
private directory (mode 0700, holding config, keys and sockets) and a JSON handle
that the gateway stores in its state database:

``start`` (at reserve, with the stream's listening sockets already bound),
``connect`` (targets and the pinned peer certificate), ``status``, ``stop``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from scistream_proxy import native
from scistream_proxy.process import ProcessIdentity, ProxyStartError, spawn_detached, terminate

__all__ = ["BACKENDS", "NativeBackend", "ProxyBackend", "ProxyError", "ProxySpec",
           "ProxyUnavailable", "get_backend"]


class ProxyError(RuntimeError):
    """A backend could not do what was asked (start, configure, report)."""


class ProxyUnavailable(ProxyError):
    """What the backend needs (a container engine, an image) cannot be used right now."""


@dataclass
class ProxySpec:
    """What a backend needs to start one stream end's proxy."""

    uid: str
    role: str  # "PROD": accept from the peer gateway; "CONS": accept from the app
    stream_dir: Path
    sockets: list[socket.socket]  # bound and listening; the backend takes them over
    rate: int = 0  # kbit/s for the whole stream, 0 = unlimited
    cert_file: str = "cert.pem"
    key_file: str = "key.pem"
    gateway: str = ""  # the gateway's name (labels of containers)
    timeouts: dict = field(default_factory=dict)


class ProxyBackend(ABC):
    """One way of running S2DS. Implementations must leave nothing behind after ``stop``."""

    name: str
    supports_rate = False  # can enforce a nonzero `rate`; otherwise reserve refuses it
    supports_plain = True  # can relay plain TCP between gateways (`tls: false`)
    reuseport = False  # binds the stream's ports itself: they are bound with SO_REUSEPORT

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this node, or None when it can."""
        return None

    @abstractmethod
    def start(self, spec: ProxySpec) -> dict:
        """Start the proxy holding the spec's listening sockets; return its JSON handle."""

    @abstractmethod
    def connect(
        self, handle: dict, stream_dir: Path, *, targets: list[str], tls: bool,
        peer_cert_file: str | None, peer_fingerprint: str | None,
    ) -> dict | None:
        """Give the proxy its targets; return once it accepts connections.

        Returns the stream's new handle when it changed (the proxy started now), else None.
        """

    @abstractmethod
    def status(self, handle: dict, stream_dir: Path) -> dict:
        """``{"alive": bool, "bytes": {...} | None, ...}``; never raises for a dead proxy."""

    @abstractmethod
    def stop(self, handle: dict, stream_dir: Path) -> None:
        """Stop the proxy if it runs; safe to call again."""


def connect_in_dir(sock: socket.socket, stream_dir: Path, name: str) -> None:
    """Connect ``sock`` to the unix socket ``name`` in ``stream_dir``.

    Reached through a descriptor of its directory: the path stays short however deep
    the state directory is (a sockaddr_un path holds 108 bytes), and the directory's
    0700 mode still decides who may connect.
    """
    dir_fd = os.open(stream_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{dir_fd}/{name}")
    finally:
        os.close(dir_fd)


def control_request(stream_dir: Path, request: dict, timeout_s: float = 5.0) -> dict:
    """One JSON request/reply over a native proxy's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            connect_in_dir(sock, stream_dir, native.CONTROL_SOCKET)
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = sock.makefile("rb").readline()
        except OSError as exc:
            raise ProxyError(f"proxy control socket: {exc}") from None
    if not line:
        raise ProxyError("proxy closed its control socket without a reply")
    return json.loads(line)


class NativeBackend(ProxyBackend):
    """This project's relay (``scistream_proxy.native``), one daemon per stream end."""

    name = "native"
    supports_rate = True

    def start(self, spec: ProxySpec) -> dict:
        config = {
            "uid": spec.uid,
            "role": spec.role,
            "listen_fds": [s.fileno() for s in spec.sockets],
            "rate": spec.rate,
            "cert": spec.cert_file,
            "key": spec.key_file,
            **spec.timeouts,
        }
        (spec.stream_dir / native.CONFIG_FILE).write_text(json.dumps(config))
        try:
            identity = spawn_detached(
                [sys.executable, "-P", "-m", "scistream_proxy.native_daemon",
                 "--stream-dir", str(spec.stream_dir)],
                cwd=spec.stream_dir,
                log_path=spec.stream_dir / "proxy.log",
                pass_fds=tuple(s.fileno() for s in spec.sockets),
            )
        except ProxyStartError as exc:
            raise ProxyError(f"native proxy failed to start: {exc}") from None
        return {"pid": identity.pid, "start_time": identity.start_time}

    def connect(self, handle, stream_dir, *, targets, tls, peer_cert_file, peer_fingerprint):
        reply = control_request(stream_dir, {
            "op": "connect", "targets": targets, "tls": tls,
            "peer_cert": peer_cert_file, "peer_fingerprint": peer_fingerprint,
        })
        if not reply.get("ok"):
            raise ProxyError(f"native proxy refused connect: {reply.get('error', reply)}")

    def status(self, handle, stream_dir):
        identity = ProcessIdentity(handle["pid"], handle["start_time"])
        if not identity.alive():
            return {"alive": False, "bytes": None, "pid": identity.pid}
        try:
            reply = control_request(stream_dir, {"op": "status"}, timeout_s=2.0)
        except ProxyError as exc:
            return {"alive": True, "bytes": None, "pid": identity.pid, "detail": str(exc)}
        return {
            "alive": True,
            "pid": identity.pid,
            "bytes": {"to_app": reply["bytes_to_app"], "from_app": reply["bytes_from_app"]},
            "connections": {
                "active": reply["connections_active"],
                "total": reply["connections_total"],
                "failed": reply["connections_failed"],
            },
            "last_error": reply["last_error"],
        }

    def stop(self, handle, stream_dir):
        identity = ProcessIdentity(handle["pid"], handle["start_time"])
        if not identity.alive():
            return
        try:
            control_request(stream_dir, {"op": "stop"}, timeout_s=2.0)
        except ProxyError:
            pass  # wedged or half-dead: terminate() below escalates to signals
        terminate(identity)


def _all_backends() -> dict[str, ProxyBackend]:
    from scistream_proxy.docker_backends import HAProxyDockerBackend, NginxDockerBackend
    from scistream_proxy.external import HAProxyBackend, NginxBackend, StunnelBackend

    backends = (NativeBackend(), StunnelBackend(), HAProxyBackend(), NginxBackend(),
                HAProxyDockerBackend(), NginxDockerBackend())
    return {b.name: b for b in backends}


BACKENDS: dict[str, ProxyBackend] = _all_backends()


def get_backend(name: str) -> ProxyBackend:
    """The backend called ``name``; KeyError names the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown proxy backend {name!r}; known: {sorted(BACKENDS)}") from None
