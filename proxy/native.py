"""The native S2DS: one detached relay process per gateway, hosting every native stream.

Lifecycle (driven by ``scistream_proxy.native_backend.NativeBackend``):

1. the first ``reserve`` of a gateway starts the relay (``spawn_detached``) with that
   stream's listening sockets, already bound by the gateway, as inherited descriptors,
   so the kernel holds the stream's ports from the first moment; the relay works in
   the gateway's ``relay`` directory (0700, beside ``streams``), opens its control
   socket there and reports ``{"pid": ...}`` on the ready pipe;
2. every later ``reserve`` hands its listening sockets to the running relay over that
   control socket (SCM_RIGHTS, op ``add``); starting, adding and stopping streams are
   serialised by an flock in the relay directory, so a stream never joins a relay that
   is exiting;
3. ``connect`` (keyed by the stream's name) gives a stream its targets and the peer's
   pinned certificate; only then does it accept. Connections that arrive earlier wait
   in the kernel's backlog;
4. ``status`` reports a stream's counters; ``stop`` closes its listeners and cuts its
   connections (a reset to the app, a TLS hop without close_notify: truncation); the
   relay exits when its last stream is stopped, so nothing runs without a live stream.

What runs where: :mod:`scistream_proxy.streams` (a stream end, each connection's set-up),
:mod:`scistream_proxy.pump` and :mod:`scistream_proxy.engines` (the bytes),
:mod:`scistream_proxy.frames` (sealed frames), :mod:`scistream_proxy.limits` (rate limits,
counters), :mod:`scistream_proxy.ktls` (kernel TLS).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path

from scistream_proxy.daemon import become_daemon
from scistream_proxy.limits import Slots
from scistream_proxy.relay_files import CONFIG_FILE, CONTROL_SOCKET, FDS_PER_MESSAGE
from scistream_proxy.streams import MAX_PENDING_HANDSHAKES, Stream


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Relay:
    """Every native stream of one gateway; answers the control socket until the last
    stream is stopped."""

    def __init__(self, control: socket.socket):
        self.control = control
        self.streams: dict[str, Stream] = {}
        # Inbound handshakes pending in all streams, sized by the first stream's config
        # (every stream of a gateway has the same settings while its relay runs).
        self.pending: Slots | None = None

    def handle(self, conn: socket.socket) -> dict:
        """Answer one request; the reply says ``exiting`` when no stream is left."""
        data, fds = b"", []
        while b"\n" not in data:
            chunk, more, _, _ = socket.recv_fds(conn, 1 << 16, FDS_PER_MESSAGE)
            if not chunk:
                break
            data += chunk
            fds += more
        try:
            request = json.loads(data)
            op = request.get("op")
            if op == "add":
                count = int(request["count"])
                while len(fds) < count:  # further batches, one marker byte each
                    chunk, more, _, _ = socket.recv_fds(conn, 1, FDS_PER_MESSAGE)
                    if not chunk:
                        raise ConnectionError("control connection closed mid-add")
                    fds += more
                listeners = [socket.socket(fileno=fd) for fd in fds]
                fds = []
                return self.add(Path(request["stream_dir"]), request["config"], listeners)
            if op == "list":  # the gateway's reconciliation asks what runs here
                return {"ok": True, "pid": os.getpid(), "streams": sorted(self.streams)}
            stream = self.streams.get(request.get("stream", ""))
            if op == "stop":
                if stream is not None:
                    stream.stop()
                    del self.streams[stream.name]
                return {"ok": True, "known": stream is not None, "pid": os.getpid(),
                        "exiting": not self.streams}
            if stream is None:
                return {"ok": False, "unknown": True,
                        "error": f"no stream {request.get('stream')!r} in this relay"}
            if op == "connect":
                return stream.connect(request)
            if op == "status":
                return stream.status()
            return {"ok": False, "error": f"unknown op {op!r}"}
        finally:
            for fd in fds:  # descriptors of a request that failed
                os.close(fd)

    def add(self, stream_dir: Path, config: dict, listeners: list[socket.socket]) -> dict:
        name = stream_dir.name
        if name in self.streams:
            # The gateway adds a stream only when it has no record of one by that name:
            # this one was taken over by a reserve whose worker died before recording
            # it, and is abandoned. Its ports are the gateway's to give again.
            _log(f"{name}: replacing an abandoned stream of the same name")
            self.streams.pop(name).stop()
        if self.pending is None:
            self.pending = Slots(config.get("max_pending_handshakes", MAX_PENDING_HANDSHAKES))
        self.streams[name] = Stream(name, stream_dir, config, listeners, _log, self.pending)
        return {"ok": True, "pid": os.getpid()}

    def serve(self) -> None:
        """One JSON request per control connection, until no stream is left."""
        while True:
            conn, _ = self.control.accept()
            with conn:
                conn.settimeout(10)
                try:
                    reply = self.handle(conn)
                except Exception as exc:  # noqa: BLE001 - report, keep serving
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                exiting = bool(reply.get("exiting"))
                if exiting:
                    # Gone from the directory before the stopper (holding the relay lock)
                    # hears back, so the next reserve starts a new relay.
                    Path(CONTROL_SOCKET).unlink(missing_ok=True)
                    self.control.close()
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass
            if exiting:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scistream_proxy.native_daemon",
        description="Run a gateway's native S2DS relay, which hosts every native stream of "
        "that gateway (started by the gateway, not by hand).",
    )
    parser.add_argument("--relay-dir", required=True, type=Path,
                        help="the gateway's relay directory (control socket, lock, log)")
    parser.add_argument("--stream-dir", required=True, type=Path,
                        help="the first stream's private directory holding proxy.json and "
                        "keys; its listening sockets are inherited")
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="inherited pipe to report readiness on")
    parser.add_argument("--foreground", action="store_true",
                        help="do not fork away from the caller (for debugging)")
    args = parser.parse_args(argv)

    report = become_daemon(args.ready_fd, foreground=args.foreground)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    try:
        # Work inside the relay directory: the control socket is bound by a short
        # relative name (AF_UNIX paths are limited to 108 bytes).
        os.chdir(args.relay_dir)
        stream_dir = args.stream_dir.resolve()
        config = json.loads((stream_dir / CONFIG_FILE).read_text())
        listeners = [socket.socket(fileno=fd) for fd in config["listen_fds"]]
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        Path(CONTROL_SOCKET).unlink(missing_ok=True)  # of a relay that was killed
        control.bind(CONTROL_SOCKET)
        control.listen(64)
        server = Relay(control)
        server.add(stream_dir, config, listeners)
    except Exception as exc:  # noqa: BLE001 - the starter gets the reason
        report({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    report({"pid": os.getpid()})
    server.serve()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown while relay threads still hold sockets
