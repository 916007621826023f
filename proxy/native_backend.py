"""The native backend: a gateway's streams in its one relay process
(``scistream_proxy.native``), reached through the relay's control socket."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

from scistream_proxy import relay_files
from scistream_proxy.backends import ProxyBackend, ProxyError, ProxySpec, connect_in_dir
from scistream_proxy.process import ProcessIdentity, ProxyStartError, spawn_detached

__all__ = ["NativeBackend", "control_request"]


def control_request(stream_dir: Path, request: dict, timeout_s: float = 5.0,
                    name: str = relay_files.CONTROL_SOCKET, fds: list[int] = ()) -> dict:
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
            batches = [fds[i:i + relay_files.FDS_PER_MESSAGE]
                       for i in range(0, len(fds), relay_files.FDS_PER_MESSAGE)] or [[]]
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
    fd = os.open(relay_dir / relay_files.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        relay_dir = _private_dir(relay_files.relay_dir_of(spec.stream_dir))
        config = {
            "uid": spec.uid,
            "role": spec.role,
            "rate": spec.rate,
            "cert": spec.cert_file,
            "key": spec.key_file,
            "handshake_timeout_s": self.options.handshake_timeout_s,
            "max_pending_handshakes": self.options.max_pending_handshakes,
            "conn_per_listener": self.options.conn_per_listener,
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
        (spec.stream_dir / relay_files.CONFIG_FILE).write_text(json.dumps(config))
        try:
            identity = spawn_detached(
                [sys.executable, "-P", "-m", "scistream_proxy.native_daemon",
                 "--relay-dir", str(relay_dir), "--stream-dir", str(spec.stream_dir)],
                cwd=relay_dir,
                log_path=relay_dir / relay_files.LOG_FILE,
                pass_fds=tuple(config["listen_fds"]),
                env={"OPENSSL_CONF": str(relay_files.OPENSSL_CONF_FILE)},
            )
        except ProxyStartError as exc:
            raise ProxyError(f"native proxy failed to start: {exc}") from None
        return {"pid": identity.pid, "start_time": identity.start_time}

    def connect(self, handle, stream_dir, *, targets, tls, peer_cert_file, peer_fingerprint):
        reply = control_request(relay_files.relay_dir_of(stream_dir), {
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
            reply = control_request(relay_files.relay_dir_of(stream_dir),
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
                # Inbound connections that never authenticated, and how often a cap
                # held new connections in the kernel's backlog.
                "handshakes_refused": reply["handshakes_refused"],
                "handshakes_timed_out": reply["handshakes_timed_out"],
                "capped": reply["connections_capped"],
                # What seals this stream's frames where its TLS hops may run them
                # ("cryptography"); None otherwise.
                "frames_aead": reply.get("frames_aead"),
            },
            "last_error": reply["last_error"],
        }

    def stop(self, handle, stream_dir):
        identity = ProcessIdentity(handle["pid"], handle["start_time"])
        if identity.alive():
            self._drop(stream_dir, identity)

    def abandon(self, stream_dir: Path, uid: str) -> None:
        relay_dir = relay_files.relay_dir_of(stream_dir)
        if relay_dir.is_dir():
            self._drop(stream_dir, None)

    @staticmethod
    def relay_streams(state_dir: Path) -> list[str] | None:
        """Names (uids) of the streams the gateway's running relay holds; None when no
        relay answers."""
        relay_dir = state_dir / relay_files.RELAY_DIR
        if not (relay_dir / relay_files.CONTROL_SOCKET).exists():
            return None
        try:
            reply = control_request(relay_dir, {"op": "list"}, timeout_s=5.0)
        except ProxyError:
            return None
        return list(reply["streams"]) if reply.get("ok") else None

    @staticmethod
    def _drop(stream_dir: Path, identity: ProcessIdentity | None) -> None:
        """Take the stream out of its relay; wait for the relay to exit if it was the
        last. ``identity`` None: whichever relay runs now (abandon). A process is
        signalled only if it is the one recorded *and* works in the relay directory."""
        from scistream_proxy.external import stop_in  # not on the status path: ssl

        relay_dir = relay_files.relay_dir_of(stream_dir)
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
                    stop_in(identity, relay_dir)
                return
            if not reply.get("exiting"):
                return
            pid = reply.get("pid")
            exiting = identity or (ProcessIdentity.of(pid) if pid else None)
        if exiting is not None:
            stop_in(exiting, relay_dir)  # it exits by itself; this waits, then signals


