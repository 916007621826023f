"""The native S2DS: a detached relay daemon for one stream, TLS on the gateway-to-gateway hop.

Lifecycle (driven by ``scistream_proxy.launcher``):

1. started at ``reserve`` with its listening sockets already bound by the gateway and
   passed as inherited descriptors, so the kernel holds the stream's ports from the
   first moment; it forks once more so it outlives whatever started it, opens its
   control socket and reports ``{"pid": ...}`` on the ready pipe;
2. ``connect`` (over the control socket) gives it its targets and the peer's pinned
   certificate; only then does it accept. Connections that arrive earlier wait in the
   kernel's backlog;
3. ``status`` reports counters; ``stop`` ends it.

Roles: a ``PROD`` proxy accepts TLS from the peer gateway and connects in plain TCP to
the producer app; a ``CONS`` proxy accepts plain TCP from the consumer app and connects
over TLS to the peer gateway. Connection *i* of listener *i* goes to ``targets[i % n]``.

Each relayed connection is one thread that owns both of its sockets, so an SSL object
is never used by two threads at once (OpenSSL forbids it; TLS 1.3 reads can write).
Byte moves release the GIL (socket calls, OpenSSL), so connections use all cores.

End of data in either direction ends the connection in order: everything already
received is delivered, the end is signalled (FIN on a plain hop, TLS close_notify on
the TLS hop) and the other side is drained until it closes, so no reset can destroy
data in flight. A TLS hop that ends without close_notify (a killed peer, an injected
FIN) is a truncation: the app side is reset, never closed cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

from scistream_proxy.process import become_daemon
from scistream_proxy.tls import fingerprint_of_der, pinned_context

BUFFER_SIZE = 64 * 1024
CONTROL_SOCKET = "control.sock"
CONFIG_FILE = "proxy.json"
# How long an ended connection waits for its peer to close before it is cut.
DRAIN_TIMEOUT_S = 10.0


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: the inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TokenBucket:
    """Stream-wide rate limit shared by all connections; ``rate_kbps`` 0 = unlimited."""

    def __init__(self, rate_kbps: int):
        self.rate = rate_kbps * 1000 / 8  # bytes per second
        self.capacity = max(self.rate / 10, BUFFER_SIZE)  # 100 ms burst
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def chunk(self) -> int:
        """Largest read worth doing under the limit (smooths the rate)."""
        return int(min(BUFFER_SIZE, max(1024, self.rate / 50)))

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            deficit = -self.tokens
        if deficit > 0:
            time.sleep(deficit / self.rate)


class Counters:
    """Per-stream totals, live: running connections count what they moved so far."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_to_app = 0  # of ended connections; live ones are in self.live
        self.bytes_from_app = 0
        self.live: set[tuple[_Half, _Half]] = set()  # (app -> peer, peer -> app)
        self.total = 0
        self.failed = 0
        self.last_error = ""

    def track(self, halves: tuple[_Half, _Half]) -> None:
        with self.lock:
            self.live.add(halves)

    def settle(self, halves: tuple[_Half, _Half]) -> None:
        """A connection ended (cleanly or not): fold what it moved into the totals."""
        with self.lock:
            self.live.discard(halves)
            self.bytes_from_app += halves[0].moved
            self.bytes_to_app += halves[1].moved

    def snapshot(self) -> dict:
        with self.lock:
            # `moved` is a plain int another thread rebinds: reading it needs no lock.
            return {
                "bytes_to_app": self.bytes_to_app + sum(h[1].moved for h in self.live),
                "bytes_from_app": self.bytes_from_app + sum(h[0].moved for h in self.live),
                "connections_active": len(self.live),
                "connections_total": self.total,
                "connections_failed": self.failed,
                "last_error": self.last_error,
            }


class _Half:
    """One direction of a relayed connection: src -> dst through a reused buffer."""

    __slots__ = ("src", "dst", "buf", "view", "start", "end", "eof", "wait", "moved", "bucket")

    def __init__(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket | None):
        self.src, self.dst = src, dst
        self.buf = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.eof = False
        self.wait: tuple[socket.socket, int] | None = None
        self.moved = 0
        self.bucket = bucket

    @property
    def finished(self) -> bool:
        return self.eof and self.start == self.end

    def run(self) -> None:
        """Move bytes until a socket would block; record what to wait for."""
        self.wait = None
        while True:
            if self.start < self.end:
                try:
                    n = self.dst.send(self.view[self.start : self.end])
                except (BlockingIOError, ssl.SSLWantWriteError):
                    self.wait = (self.dst, selectors.EVENT_WRITE)
                    return
                except ssl.SSLWantReadError:
                    self.wait = (self.dst, selectors.EVENT_READ)
                    return
                self.start += n
                self.moved += n
                continue
            if self.eof:
                return
            size = BUFFER_SIZE if self.bucket is None else self.bucket.chunk()
            try:
                n = self.src.recv_into(self.view[:size])
            except (BlockingIOError, ssl.SSLWantReadError):
                self.wait = (self.src, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self.wait = (self.src, selectors.EVENT_WRITE)
                return
            if n == 0:
                self.eof = True
                continue
            if self.bucket is not None:
                self.bucket.take(n)
            self.start, self.end = 0, n


def _abort(*socks: socket.socket) -> None:
    """Close with a reset, so the app sees an error rather than a clean end of data."""
    for sock in socks:
        try:
            raw = sock
            if isinstance(sock, ssl.SSLSocket):
                raw = socket.socket(fileno=sock.detach())
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            raw.close()
        except OSError:
            pass


def _finish(src: socket.socket, dst: socket.socket, delivered: bool) -> None:
    """src said end-of-data and all of it reached dst: end dst, drain, close both.

    Draining dst (reading until it closes) keeps a reset from destroying bytes we
    delivered that it has not read yet; if we delivered nothing, a plain dst is cut
    at once, so a sender learns promptly that its receiver went away.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    if isinstance(src, ssl.SSLSocket):
        try:  # answer the peer's close_notify
            src.settimeout(1.0)
            src.unwrap()
        except (OSError, ValueError):
            pass
    try:
        if isinstance(dst, ssl.SSLSocket):
            # Sends close_notify, then reads (discarding) until the peer's arrives.
            dst.settimeout(DRAIN_TIMEOUT_S)
            dst.unwrap()
        elif not delivered:
            _abort(dst)
        else:
            dst.shutdown(socket.SHUT_WR)
            dst.settimeout(DRAIN_TIMEOUT_S)
            sink = bytearray(BUFFER_SIZE)
            while time.monotonic() < deadline and dst.recv_into(sink):
                pass
    except (OSError, ValueError):
        pass
    for sock in (src, dst):
        try:
            sock.close()
        except OSError:
            pass


def relay(a: socket.socket, b: socket.socket, bucket: TokenBucket | None,
          counters: Counters) -> None:
    """Relay between ``a`` (app side) and ``b`` until one side ends, counting bytes live.

    Raises whatever the sockets raise (reset, TLS truncation); the caller aborts.
    """
    a.setblocking(False)
    b.setblocking(False)
    ab, ba = _Half(a, b, bucket), _Half(b, a, bucket)
    counters.track((ab, ba))
    sel = selectors.DefaultSelector()
    registered: dict[socket.socket, int] = {}
    try:
        while True:
            ab.run()
            ba.run()
            for half in (ab, ba):
                if half.finished:
                    a.setblocking(True)
                    b.setblocking(True)
                    _finish(half.src, half.dst, delivered=half.moved > 0)
                    return
            wanted: dict[socket.socket, int] = {a: 0, b: 0}
            for half in (ab, ba):
                if half.wait is not None:
                    wanted[half.wait[0]] |= half.wait[1]
            for sock, events in wanted.items():
                old = registered.get(sock, 0)
                if events == old:
                    continue
                if not events:
                    sel.unregister(sock)
                elif not old:
                    sel.register(sock, events)
                else:
                    sel.modify(sock, events)
                registered[sock] = events
            sel.select()
    finally:
        sel.close()
        counters.settle((ab, ba))


class NativeProxy:
    """One stream's relay: listeners, accept threads, connection threads, counters."""

    def __init__(self, stream_dir: Path, config: dict):
        self.dir = stream_dir
        self.role = config["role"]
        self.listeners = [socket.socket(fileno=fd) for fd in config["listen_fds"]]
        self.counters = Counters()
        self.bucket = TokenBucket(config["rate"]) if config.get("rate") else None
        self.handshake_timeout = float(config.get("handshake_timeout_s", 30))
        self.connect_timeout = float(config.get("connect_timeout_s", 10))
        self.cert_path = stream_dir / config["cert"]
        self.key_path = stream_dir / config["key"]
        self.targets: list[tuple[str, int]] = []
        self.context: ssl.SSLContext | None = None
        self.peer_fingerprint = ""
        self.state = "waiting"
        self.stopping = threading.Event()

    # -- control operations -------------------------------------------------
    def connect(self, request: dict) -> dict:
        if self.state != "waiting":
            return {"ok": self.state == "running", "state": self.state}
        self.targets = [parse_address(t) for t in request["targets"]]
        if request.get("tls", True):
            self.peer_fingerprint = request["peer_fingerprint"]
            self.context = pinned_context(
                server=self.role == "PROD",
                cert_path=self.cert_path,
                key_path=self.key_path,
                peer_cert_path=self.dir / request["peer_cert"],
            )
        for index, listener in enumerate(self.listeners):
            threading.Thread(
                target=self._accept_loop, args=(index, listener), daemon=True,
                name=f"accept-{index}",
            ).start()
        self.state = "running"
        return {"ok": True, "state": self.state}

    def status(self) -> dict:
        return {"ok": True, "state": self.state, "pid": os.getpid(), **self.counters.snapshot()}

    # -- data path ------------------------------------------------------------
    def _accept_loop(self, index: int, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and friends: back off rather than spin
                continue
            threading.Thread(
                target=self._serve, args=(index, conn), daemon=True, name=f"conn-{index}"
            ).start()

    def _secure(self, sock: socket.socket, server_side: bool) -> ssl.SSLSocket:
        sock.settimeout(self.handshake_timeout)
        tls = self.context.wrap_socket(  # type: ignore[union-attr]
            sock, server_side=server_side, suppress_ragged_eofs=False
        )
        presented = tls.getpeercert(binary_form=True)
        if presented is None or fingerprint_of_der(presented) != self.peer_fingerprint:
            raise ssl.SSLError("peer certificate does not match the pinned fingerprint")
        return tls

    def _serve(self, index: int, inbound: socket.socket) -> None:
        c = self.counters
        with c.lock:
            c.total += 1
        outbound = None
        try:
            inbound.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = self.targets[index % len(self.targets)]
            if self.role == "PROD":
                if self.context is not None:
                    inbound = self._secure(inbound, server_side=True)
                outbound = socket.create_connection(target, timeout=self.connect_timeout)
                app_side, peer_side = outbound, inbound
            else:
                outbound = socket.create_connection(target, timeout=self.connect_timeout)
                if self.context is not None:
                    outbound = self._secure(outbound, server_side=False)
                app_side, peer_side = inbound, outbound
            outbound.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            relay(app_side, peer_side, self.bucket, c)
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection only
            with c.lock:
                c.failed += 1
                c.last_error = f"connection {index}: {type(exc).__name__}: {exc}"
            print(c.last_error, file=sys.stderr, flush=True)
            _abort(*(s for s in (inbound, outbound) if s is not None))

    def stop(self) -> None:
        """Mark the relay stopped; the process then exits and the kernel closes every
        socket at once, so the apps see the stream cut (a TLS hop without close_notify
        is reported as truncated on the other gateway)."""
        self.stopping.set()


def serve_control(proxy: NativeProxy, control: socket.socket) -> None:
    """Answer one JSON request per control connection until told to stop."""
    while True:
        conn, _ = control.accept()
        with conn:
            conn.settimeout(5)
            try:
                request = json.loads(conn.makefile("rb").readline())
                op = request.get("op")
                if op == "connect":
                    reply = proxy.connect(request)
                elif op == "status":
                    reply = proxy.status()
                elif op == "stop":
                    reply = {"ok": True}
                else:
                    reply = {"ok": False, "error": f"unknown op {op!r}"}
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                op = None
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
        if op == "stop":
            proxy.stop()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scistream_proxy.native_daemon",
        description="Run one stream's native S2DS relay (started by a gateway, not by hand).",
    )
    parser.add_argument("--stream-dir", required=True, type=Path,
                        help="the stream's private directory holding proxy.json and keys")
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="inherited pipe to report readiness on")
    parser.add_argument("--foreground", action="store_true",
                        help="do not fork away from the caller (for debugging)")
    args = parser.parse_args(argv)

    report = become_daemon(args.ready_fd, foreground=args.foreground)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    try:
        # Work inside the stream directory: the control socket is bound by a short
        # relative name (AF_UNIX paths are limited to 108 bytes).
        os.chdir(args.stream_dir)
        config = json.loads(Path(CONFIG_FILE).read_text())
        proxy = NativeProxy(args.stream_dir.resolve(), config)
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control_path = Path(CONTROL_SOCKET)
        control_path.unlink(missing_ok=True)
        control.bind(CONTROL_SOCKET)
        control.listen(16)
    except Exception as exc:  # noqa: BLE001 - the starter gets the reason
        report({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    report({"pid": os.getpid()})
    serve_control(proxy, control)
    control_path.unlink(missing_ok=True)
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown while relay threads still hold sockets
