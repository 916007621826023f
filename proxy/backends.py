"""The S2DS backend interface and its registry; ``native`` is the default backend.

A gateway drives every backend through the same four steps, all keyed by the stream's
private directory (mode 0700, holding config, keys and sockets) and a JSON handle
that the gateway stores in its state database:

``start`` (at reserve, with the stream's listening sockets already bound),
``connect`` (targets and the pinned peer certificate), ``status``, ``stop``.
"""

from __future__ import annotations

import importlib
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BACKENDS", "DEFAULT_OPTIONS", "GatewayOptions", "ProxyBackend", "ProxyError",
           "ProxySpec", "ProxyUnavailable", "get_backend"]


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


@dataclass(frozen=True)
class GatewayOptions:
    """What a gateway's settings tell its backends (see ``GatewaySettings``)."""

    shared: bool = False  # several Unix users' gateways on this node
    docker_host: str = ""  # the container engine the settings name; "" = not named
    pids_limit: int = 256  # per container
    memory_mib: int = 512  # per container
    handshake_timeout_s: int = 5  # an inbound TLS handshake, as a whole
    max_pending_handshakes: int = 64  # unauthenticated inbound connections per relay
    conn_per_listener: int = 4  # a stream's connections per listener (16 at least)


DEFAULT_OPTIONS = GatewayOptions()


class ProxyBackend(ABC):
    """One way of running S2DS. Implementations must leave nothing behind after ``stop``."""

    name: str
    supports_rate = False  # can enforce a nonzero `rate`; otherwise reserve refuses it
    supports_plain = True  # can relay plain TCP between gateways (`tls: false`)
    reuseport = False  # binds the stream's ports itself: they are bound with SO_REUSEPORT

    def __init__(self, options: GatewayOptions = DEFAULT_OPTIONS):
        self.options = options

    def refusal(self) -> str | None:
        """Why the gateway's settings alone rule this backend out, or None; checked
        when the settings are read."""
        return None

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this node, or None when it can."""
        return self.refusal()

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



# Each backend's module and class, imported on first use: the interface imports no
# backend (so none imports another through it), and a gateway loads only those it runs.
_WHERE = {
    "native": ("scistream_proxy.native_backend", "NativeBackend"),
    "stunnel": ("scistream_proxy.external", "StunnelBackend"),
    "haproxy": ("scistream_proxy.external", "HAProxyBackend"),
    "nginx": ("scistream_proxy.external", "NginxBackend"),
    "haproxy-docker": ("scistream_proxy.docker_backends", "HAProxyDockerBackend"),
    "nginx-docker": ("scistream_proxy.docker_backends", "NginxDockerBackend"),
}


class _Registry(Mapping):
    """The backends by name, with default options; each is made on first lookup."""

    def __init__(self, where: dict[str, tuple[str, str]]):
        self._where = where
        self._made: dict[tuple[str, GatewayOptions], ProxyBackend] = {}

    def made(self, name: str, options: GatewayOptions) -> ProxyBackend:
        backend = self._made.get((name, options))
        if backend is None:
            module, cls = self._where[name]
            backend = getattr(importlib.import_module(module), cls)(options)
            backend = self._made.setdefault((name, options), backend)
        return backend

    def __getitem__(self, name: str) -> ProxyBackend:
        return self.made(name, DEFAULT_OPTIONS)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


BACKENDS: Mapping[str, ProxyBackend] = _Registry(_WHERE)


def get_backend(name: str, options: GatewayOptions = DEFAULT_OPTIONS) -> ProxyBackend:
    """The backend called ``name``, as a gateway with ``options`` runs it; KeyError
    names the known ones."""
    if name not in _WHERE:
        raise KeyError(f"unknown proxy backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS.made(name, options)
