"""The S2DS backend interface and its registry; ``native`` is the default backend.

A gateway drives every backend through the same four steps, all keyed by the stream's
private directory (mode 0700, holding config, keys and sockets) and a JSON handle
that the gateway stores in its state database:

``start`` (at reserve, with the stream's listening sockets already bound),
``connect`` (targets and the pinned peer certificate), ``status``, ``stop``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import sys
from abc import ABC, abstractmethod
from contextlib import contextmanager
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

    @abstractmethod
    def abandon(self, stream_dir: Path, uid: str) -> None:
        """Stop whatever this backend may have started for this stream without a handle
        having been recorded (a worker died mid-reserve or mid-connect); idempotent."""

    def orphans(self, streams_dir: Path, live: set[str]) -> list[str]:
        """Remove what this backend runs outside any process working in a stream
        directory (containers) for streams of ``streams_dir`` not in ``live``; returns
        their uids. Processes in stream directories are the gateway's to find."""
        return []


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


def control_request(stream_dir: Path, request: dict, timeout_s: float = 5.0,
                    name: str = native.CONTROL_SOCKET, fds: list[int] = ()) -> dict:
    """One JSON request/reply over a unix control socket ``name`` in ``stream_dir``
    (a native relay's by default), with ``fds`` passed along (SCM_RIGHTS).

    Raises:
        ProxyError: no reply (the error of a socket nobody listens on is a
            ``ConnectionRefusedError`` or ``FileNotFoundError`` as ``__cause__``).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            connect_in_dir(sock, stream_dir, name)
        except OSError as exc:
            raise ProxyError(f"proxy control socket: {exc}") from exc
        try:
            line = json.dumps(request).encode() + b"\n"
            batches = [fds[i:i + native.FDS_PER_MESSAGE]
                       for i in range(0, len(fds), native.FDS_PER_MESSAGE)] or [[]]
            socket.send_fds(sock, [line], batches[0]) if fds else sock.sendall(line)
            for batch in batches[1:]:
                socket.send_fds(sock, [b"+"], batch)
            line = sock.makefile("rb").readline()
        except OSError as exc:
            raise ProxyError(f"proxy control socket: {exc}") from None
    if not line:
        raise ProxyError("proxy closed its control socket without a reply")
    return json.loads(line)


@contextmanager
def _relay_lock(relay_dir: Path):
    """Serialise starting, adding to and stopping a gateway's relay (all its workers)."""
    fd = os.open(relay_dir / native.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ProxyError(f"{path} must be a directory of uid {os.getuid()} with mode 0700")
    return path


class NativeBackend(ProxyBackend):
    """This project's relay (``scistream_proxy.native``): one process per gateway state
    directory hosts every native stream of that gateway; it starts with the first
    stream and exits with the last. A stream's handle is the relay's pid and start
    time; the relay knows the stream by its directory's name."""

    name = "native"
    supports_rate = True

    def start(self, spec: ProxySpec) -> dict:
        relay_dir = _private_dir(native.relay_dir_of(spec.stream_dir))
        config = {
            "uid": spec.uid,
            "role": spec.role,
            "rate": spec.rate,
            "cert": spec.cert_file,
            "key": spec.key_file,
            **spec.timeouts,
        }
        fds = [s.fileno() for s in spec.sockets]
        with _relay_lock(relay_dir):
            try:
                reply = control_request(relay_dir, {
                    "op": "add", "stream_dir": str(spec.stream_dir), "config": config,
                    "count": len(fds)}, fds=fds)
            except ProxyError as exc:
                if not isinstance(exc.__cause__, (ConnectionRefusedError, FileNotFoundError)):
                    raise
                return self._start_relay(relay_dir, spec, {**config, "listen_fds": fds})
        if not reply.get("ok"):
            raise ProxyError(f"native relay refused the stream: {reply.get('error', reply)}")
        identity = ProcessIdentity.of(int(reply["pid"]))
        if identity is None:
            raise ProxyError("native relay took the stream and exited")
        return {"pid": identity.pid, "start_time": identity.start_time}

    @staticmethod
    def _start_relay(relay_dir: Path, spec: ProxySpec, config: dict) -> dict:
        """No relay runs for this gateway: start one with this stream as its first."""
        (spec.stream_dir / native.CONFIG_FILE).write_text(json.dumps(config))
        try:
            identity = spawn_detached(
                [sys.executable, "-P", "-m", "scistream_proxy.native_daemon",
                 "--relay-dir", str(relay_dir), "--stream-dir", str(spec.stream_dir)],
                cwd=relay_dir,
                log_path=relay_dir / native.LOG_FILE,
                pass_fds=tuple(config["listen_fds"]),
                env={"OPENSSL_CONF": str(native.OPENSSL_CONF_FILE),
                     "SCISTREAM_PROXY_RELAY": "1"},  # see scistream_proxy/__init__.py
            )
        except ProxyStartError as exc:
            raise ProxyError(f"native proxy failed to start: {exc}") from None
        return {"pid": identity.pid, "start_time": identity.start_time}

    def connect(self, handle, stream_dir, *, targets, tls, peer_cert_file, peer_fingerprint):
        reply = control_request(native.relay_dir_of(stream_dir), {
            "op": "connect", "stream": stream_dir.name, "targets": targets, "tls": tls,
            "peer_cert": peer_cert_file, "peer_fingerprint": peer_fingerprint,
        })
        if not reply.get("ok"):
            raise ProxyError(f"native proxy refused connect: {reply.get('error', reply)}")

    def status(self, handle, stream_dir):
        identity = ProcessIdentity(handle["pid"], handle["start_time"])
        if not identity.alive():
            return {"alive": False, "bytes": None, "pid": identity.pid}
        try:
            reply = control_request(native.relay_dir_of(stream_dir),
                                    {"op": "status", "stream": stream_dir.name}, timeout_s=2.0)
        except ProxyError as exc:
            return {"alive": True, "bytes": None, "pid": identity.pid, "detail": str(exc)}
        if reply.get("unknown"):  # the relay runs, but no longer (or never) held this stream
            return {"alive": False, "bytes": None, "pid": identity.pid,
                    "detail": reply.get("error")}
        return {
            "alive": True,
            "pid": identity.pid,
            "bytes": {"to_app": reply["bytes_to_app"], "from_app": reply["bytes_from_app"]},
            "connections": {
                "active": reply["connections_active"],
                "total": reply["connections_total"],
                "failed": reply["connections_failed"],
                "spliced": reply["connections_spliced"],
                "bio": reply.get("connections_bio", 0),
                "frames": reply.get("connections_frames", 0),
                "pumped": reply.get("connections_pumped", 0),
                "ktls": reply["connections_ktls"],
                # Which AES-GCM seals the frames (scistream_proxy.frames.AEAD_ENV) where
                # this stream's TLS hops may run them; None otherwise.
                "frames_aead": reply.get("frames_aead"),
            },
            "last_error": reply["last_error"],
        }

    def stop(self, handle, stream_dir):
        identity = ProcessIdentity(handle["pid"], handle["start_time"])
        if identity.alive():
            self._drop(stream_dir, identity)

    def abandon(self, stream_dir: Path, uid: str) -> None:
        relay_dir = native.relay_dir_of(stream_dir)
        if relay_dir.is_dir():
            self._drop(stream_dir, None)

    @staticmethod
    def relay_streams(state_dir: Path) -> list[str] | None:
        """Names (uids) of the streams the gateway's running relay holds; None when no
        relay answers."""
        relay_dir = state_dir / native.RELAY_DIR
        if not (relay_dir / native.CONTROL_SOCKET).exists():
            return None
        try:
            reply = control_request(relay_dir, {"op": "list"}, timeout_s=5.0)
        except ProxyError:
            return None
        return list(reply["streams"]) if reply.get("ok") else None

    @staticmethod
    def _drop(stream_dir: Path, identity: ProcessIdentity | None) -> None:
        """Take the stream out of its relay; wait for the relay to exit if it was the
        last. ``identity`` None: whichever relay runs now (abandon)."""
        relay_dir = native.relay_dir_of(stream_dir)
        with _relay_lock(relay_dir):
            if identity is not None and not identity.alive():
                return
            try:
                reply = control_request(relay_dir, {"op": "stop", "stream": stream_dir.name},
                                        timeout_s=10.0)
            except ProxyError:
                if identity is not None:
                    # Wedged: a relay that cannot answer serves no stream; its end shows
                    # as dead in every stream's status.
                    terminate(identity)
                return
            if not reply.get("exiting"):
                return
            pid = reply.get("pid")
            exiting = identity or (ProcessIdentity.of(pid) if pid else None)
        if exiting is not None:
            terminate(exiting)  # it exits by itself; this waits, then signals


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
