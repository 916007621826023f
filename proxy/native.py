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

Roles: a ``PROD`` stream accepts TLS from the peer gateway and connects in plain TCP to
the producer app; a ``CONS`` stream accepts plain TCP from the consumer app and connects
over TLS to the peer gateway. Connection *i* of listener *i* goes to ``targets[i % n]``.

How a connection moves its bytes (docs/native.md has the figures):

- TLS between two native relays (the default): the pinned TLS 1.3 handshake, then
  sealed frames (:mod:`scistream_proxy.frames`: AES-128-GCM frames of up to 1 MiB,
  keys agreed inside the TLS session), moved by one of the relay's pumps;
- TLS with any other peer: TLS records through memory BIOs (:class:`TlsPeer`), or with
  OpenSSL on the socket and kernel TLS where the kernel offers it (see
  :func:`ktls_available`); one thread owns both sockets, so an SSL object is never used
  by two threads at once (OpenSSL forbids it; TLS 1.3 reads can write);
- plain TCP on both sides: moved by one of the relay's pumps, through a 1 MiB buffer
  per direction while the pump moves few connections, with ``splice(2)`` through a pipe
  beyond (:data:`PLAIN_IO_ENV`, :data:`SPLICE_FROM`).

A pump (:mod:`scistream_proxy.pump`) is one thread with an ``epoll`` loop moving the
bytes of many connections; a relay runs half as many as it has cores (at least one,
``SCISTREAM_NATIVE_PUMPS``; 0: a thread per direction instead, as a throttled
connection always has). Byte moves and AES-GCM release the GIL, so pumps use more than
one core; a thread per connection only sets it up (accept, connect, handshake).
The relay's OpenSSL prefers AES-128-GCM (see :data:`OPENSSL_CONF_FILE`).

Ends: on the per-direction paths (frames, plain copies) each direction ends by itself
(a FIN or the end frame travels on after every byte; the other direction keeps running,
as over one TCP connection). On the TLS-record paths the first end ends the connection
in order: everything already received is delivered, the end is signalled (FIN, TLS
close_notify) and the other side is drained until it closes. A TLS hop that ends
without its end (close_notify, the end frame: a killed peer, an injected FIN) is a
truncation: the app side is reset, never closed cleanly. A broken connection is cut
with a reset on both sides (:func:`scistream_proxy.frames.reset_now`), never a FIN.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from scistream_proxy import frames, pump
from scistream_proxy.addresses import parse_address
from scistream_proxy.daemon import become_daemon
from scistream_proxy.relay_files import CONFIG_FILE, CONTROL_SOCKET, FDS_PER_MESSAGE
from scistream_proxy.tls import fingerprint_of_der, pinned_context

BUFFER_SIZE = 64 * 1024
# A plain connection's pipe per direction (splice moves at most this much per call).
PIPE_SIZE = int(os.environ.get("SCISTREAM_NATIVE_PIPE_SIZE", 64 * 1024))
# The TLS hop through memory BIOs: one system call moves this much (many records).
TLS_CHUNK = int(os.environ.get("SCISTREAM_NATIVE_TLS_CHUNK", 256 * 1024))
# How a TLS hop moves its bytes: "frames" (the default where the kernel has no TLS:
# when both ends are native relays, they agree in the TLS handshake on sealed frames of
# up to 1 MiB, see scistream_proxy.frames; with any other peer, TLS records through
# memory BIOs), "socket" (OpenSSL on the socket: one system call per record, or kernel
# TLS; the default where the kernel has TLS) or "bio" (TLS records through memory BIOs
# always). See docs/native.md for what each measured.
TLS_IO_ENV = "SCISTREAM_NATIVE_TLS_IO"
# How a plain connection moves its bytes: "copy" (recv_into/send through a buffer of up
# to 1 MiB), "splice" (splice(2) through a pipe: the bytes never enter user space) or
# "auto" (the default: in a pump, copy while the pump moves fewer than SPLICE_FROM
# connections, splice from then on; without pumps, copy). See docs/native.md.
PLAIN_IO_ENV = "SCISTREAM_NATIVE_PLAIN_IO"
# Measured (bench/native_quick.py): one connection moved 10% faster copied, 64 moved
# 45% faster spliced, at half the CPU per GB.
SPLICE_FROM = 8
_RECORD = 16 * 1024  # the largest TLS record's plaintext
# How long an ended connection waits for its peer to close before it is cut.
DRAIN_TIMEOUT_S = 10.0

# Kernel TLS: the TCP upper-layer protocol "tls" and OpenSSL's SSL_OP_ENABLE_KTLS
# (OpenSSL 3; Python 3.11's ssl has no name for it).
TCP_ULP = 31
SOL_TLS = 282
TLS_TX, TLS_RX = 1, 2
OP_ENABLE_KTLS = 0x8
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


_ktls: str | None | bool = False  # False: not probed yet


def ktls_available() -> str | None:
    """None if this kernel offers kernel TLS (the TCP ULP ``tls``), else what is missing.

    Probed once per process on an unconnected socket: the kernel looks the ULP up by
    name first (ENOENT: no such ULP, not built or not loadable) and only then finds the
    socket is not connected (ENOTCONN: the ULP exists).
    """
    global _ktls
    if _ktls is False:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
                _ktls = None
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    _ktls = None
                elif exc.errno == errno.ENOENT:
                    _ktls = "kernel has no tls ULP (CONFIG_TLS, module tls)"
                else:
                    _ktls = f"kernel tls ULP probe failed: {exc}"
    return _ktls  # type: ignore[return-value]


def ktls_engaged(sock: socket.socket) -> tuple[bool, bool]:
    """Whether the kernel does this connection's TLS record layer: (send, receive).

    The kernel answers the TLS_TX/TLS_RX getsockopt only once keys were installed.
    """
    engaged = []
    for direction in (TLS_TX, TLS_RX):
        try:
            socket.socket.getsockopt(sock, SOL_TLS, direction, 4)
            engaged.append(True)
        except OSError:
            engaged.append(False)
    return engaged[0], engaged[1]


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
        self.spliced = 0  # connections moved with splice(2)
        self.bio = 0  # connections whose TLS hop ran through memory BIOs
        self.frames = 0  # connections whose TLS hop carried sealed frames
        self.pumped = 0  # connections moved by a pump (an event loop), not threads
        self.ktls_tx = 0  # connections whose TLS records the kernel writes / reads
        self.ktls_rx = 0
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

    @contextmanager
    def tracked(self):
        """A connection's two directions (app -> peer, peer -> app) as ``frames.Moved``,
        counted live while the block runs and folded into the totals when it ends."""
        pair = (frames.Moved(), frames.Moved())
        self.track(pair)  # type: ignore[arg-type]
        try:
            yield pair
        finally:
            self.settle(pair)  # type: ignore[arg-type]

    def snapshot(self) -> dict:
        with self.lock:
            # `moved` is a plain int another thread rebinds: reading it needs no lock.
            return {
                "bytes_to_app": self.bytes_to_app + sum(h[1].moved for h in self.live),
                "bytes_from_app": self.bytes_from_app + sum(h[0].moved for h in self.live),
                "connections_active": len(self.live),
                "connections_total": self.total,
                "connections_failed": self.failed,
                "connections_spliced": self.spliced,
                "connections_bio": self.bio,
                "connections_frames": self.frames,
                "connections_pumped": self.pumped,
                "connections_ktls": {"tx": self.ktls_tx, "rx": self.ktls_rx},
                "last_error": self.last_error,
            }


class _Half:
    """One direction of a relayed connection: src -> dst through a reused buffer."""

    __slots__ = ("src", "dst", "buf", "view", "start", "end", "eof", "wait", "moved", "bucket",
                 "coalesce")

    def __init__(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket | None):
        self.src, self.dst = src, dst
        self.coalesce = isinstance(src, ssl.SSLSocket)
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

    def close(self) -> None:
        pass

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
            self.start, self.end = 0, n
            if self.bucket is not None:
                self.bucket.take(n)
            elif self.coalesce:
                self._fill()

    def _fill(self) -> None:
        """A TLS read returns at most one record (16 KiB): read on while records are
        there, so the plain side gets one large send instead of several small ones
        (fewer system calls and packets on both ends)."""
        while self.end <= BUFFER_SIZE - _RECORD:
            try:
                n = self.src.recv_into(self.view[self.end :])
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if n == 0:
                self.eof = True
                return
            self.end += n


class _SpliceHalf:
    """One direction of a plain-TCP connection: src -> pipe -> dst with splice(2), so the
    bytes stay in the kernel. ``pending`` bytes sit in the pipe, not yet sent."""

    __slots__ = ("src", "dst", "pipe_r", "pipe_w", "pending", "eof", "wait", "moved",
                 "bucket")

    def __init__(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket | None):
        self.src, self.dst = src, dst
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:  # a pipe holds 64 KiB by default; ask for what one read may bring
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        self.pending = 0
        self.eof = False
        self.wait: tuple[socket.socket, int] | None = None
        self.moved = 0
        self.bucket = bucket

    @property
    def finished(self) -> bool:
        return self.eof and self.pending == 0

    def close(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)

    def run(self) -> None:
        self.wait = None
        src, dst = self.src.fileno(), self.dst.fileno()
        while True:
            if self.pending:
                try:  # a short splice leaves the rest in the pipe for the next round
                    n = os.splice(self.pipe_r, dst, self.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self.wait = (self.dst, selectors.EVENT_WRITE)
                    return
                self.pending -= n
                self.moved += n
                continue
            if self.eof:
                return
            size = PIPE_SIZE if self.bucket is None else self.bucket.chunk()
            try:
                n = os.splice(src, self.pipe_w, size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self.wait = (self.src, selectors.EVENT_READ)
                return
            if n == 0:
                self.eof = True
                continue
            if self.bucket is not None:
                self.bucket.take(n)
            self.pending = n


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


def _finish(src: socket.socket, dst: socket.socket, delivered: bool) -> bool:
    """src said end-of-data and all of it reached dst: end dst and drain it.

    Draining dst (reading until it closes) keeps a reset from destroying bytes we
    delivered that it has not read yet; if we delivered nothing, a plain dst is cut
    at once (returns False: the caller resets it), so a sender learns promptly that
    its receiver went away. Returns True when both may be closed normally.
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
            return False
        else:
            dst.shutdown(socket.SHUT_WR)
            dst.settimeout(DRAIN_TIMEOUT_S)
            sink = bytearray(BUFFER_SIZE)
            while time.monotonic() < deadline and dst.recv_into(sink):
                pass
    except (OSError, ValueError):
        pass
    return True


def relay(a: socket.socket, b: socket.socket, bucket: TokenBucket | None,
          counters: Counters) -> bool:
    """Relay between ``a`` (app side) and ``b`` until the connection ends, counting bytes live.

    Plain TCP on both sides: one of the relay's pumps (``scistream_proxy.pump``, an
    event loop) copies both directions through 1 MiB buffers or splices them through
    pipes (:data:`PLAIN_IO_ENV`); without a pump (a throttled connection,
    ``SCISTREAM_NATIVE_PUMPS=0``) a thread per direction copies, or with
    ``SCISTREAM_NATIVE_PLAIN_IO=splice`` this thread splices; a TLS
    hop here is OpenSSL on the socket. Returns True when the connection ended in order
    (both sockets may be closed normally), False when the caller must reset them.
    Raises whatever the sockets raise (reset, TLS truncation); the caller resets both.
    """
    plain = not isinstance(a, ssl.SSLSocket) and not isinstance(b, ssl.SSLSocket)
    plain_io = os.environ.get(PLAIN_IO_ENV, "auto")
    splice = plain_io == "splice"
    loop = _pump_for(bucket, counters) if plain else None
    if loop is not None:
        splice = splice or (plain_io == "auto" and loop.load() >= SPLICE_FROM)
        kind = pump.Splice if splice else pump.Copy
        if splice:
            with counters.lock:
                counters.spliced += 1
        with counters.tracked() as (up, down):
            loop.relay(a, b, kind(a, b, up), kind(b, a, down))
        return True
    if plain and not splice:
        with counters.tracked() as (up, down):
            frames.relay_plain(a, b, up, down, bucket)
        return True
    a.setblocking(False)
    b.setblocking(False)
    kind = _SpliceHalf if plain else _Half
    ab = kind(a, b, bucket)
    try:
        ba = kind(b, a, bucket)
    except BaseException:
        ab.close()
        raise
    counters.track((ab, ba))
    if plain:
        with counters.lock:
            counters.spliced += 1
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
                    return _finish(half.src, half.dst, delivered=half.moved > 0)
            wanted: dict[socket.socket, int] = {a: 0, b: 0}
            for half in (ab, ba):
                if half.wait is not None:
                    wanted[half.wait[0]] |= half.wait[1]
            _set_interest(sel, registered, wanted.items())
            sel.select()
    finally:
        sel.close()
        counters.settle((ab, ba))
        ab.close()
        ba.close()


class TlsPeer:
    """The TLS hop of a connection, driven through memory BIOs: the relay does the
    socket calls itself, each moving many records, and OpenSSL only encrypts and
    decrypts between memory buffers.

    One object per connection, used by that connection's thread only (an SSL object
    is never shared between threads). ``raw`` is the TCP socket of the hop.
    """

    __slots__ = ("raw", "obj", "incoming", "outgoing", "tx", "tx_off")

    def __init__(self, raw: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO):
        self.raw, self.obj = raw, obj
        self.incoming, self.outgoing = incoming, outgoing
        self.tx: memoryview | None = None  # ciphertext taken from `outgoing`, not yet sent
        self.tx_off = 0

    @classmethod
    def handshake(cls, context: ssl.SSLContext, raw: socket.socket, server_side: bool,
                  timeout: float) -> TlsPeer:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        peer = cls(raw, context.wrap_bio(incoming, outgoing, server_side=server_side),
                   incoming, outgoing)
        deadline = time.monotonic() + timeout
        while True:
            try:
                peer.obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                # A refused peer (not the pinned certificate) gets OpenSSL's alert, as
                # from a socket handshake, before the caller resets the connection.
                if peer.outgoing.pending:
                    try:
                        raw.settimeout(1.0)
                        raw.sendall(peer.outgoing.read())
                    except OSError:
                        pass
                raise
            if peer.outgoing.pending:
                raw.settimeout(max(0.001, deadline - time.monotonic()))
                raw.sendall(peer.outgoing.read())
            if done:
                return peer
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS handshake timed out")
            raw.settimeout(remaining)
            data = raw.recv(BUFFER_SIZE)
            if not data:
                raise ssl.SSLEOFError("the peer closed the connection during the handshake")
            incoming.write(data)

    def flush(self) -> bool:
        """Send the pending ciphertext; False if the socket would block first."""
        while True:
            if self.tx is None:
                if not self.outgoing.pending:
                    return True
                self.tx, self.tx_off = memoryview(self.outgoing.read()), 0
            try:
                self.tx_off += self.raw.send(self.tx[self.tx_off :])
            except BlockingIOError:
                return False
            if self.tx_off == len(self.tx):
                self.tx = None

    @property
    def flushed(self) -> bool:
        return self.tx is None and not self.outgoing.pending

    def close_blocking(self, deadline: float, wait_for_peer: bool) -> None:
        """Send close_notify; with ``wait_for_peer``, read (discarding) until the peer's
        arrives, the peer closes, or ``deadline``."""
        self.raw.setblocking(True)
        try:
            try:
                self.obj.unwrap()
                done = True
            except ssl.SSLWantReadError:
                done = False
            while True:
                self.raw.settimeout(max(0.001, deadline - time.monotonic()))
                if self.tx is not None:
                    self.raw.sendall(self.tx[self.tx_off :])
                    self.tx = None
                if self.outgoing.pending:
                    self.raw.sendall(self.outgoing.read())
                if done or not wait_for_peer or time.monotonic() >= deadline:
                    return
                data = self.raw.recv(TLS_CHUNK)
                if not data:
                    return
                self.incoming.write(data)
                try:
                    self.obj.unwrap()
                    done = True
                except ssl.SSLWantReadError:
                    pass
        except (OSError, ValueError):
            pass


def relay_tls(app: socket.socket, peer: TlsPeer, bucket: TokenBucket | None,
              counters: Counters) -> bool:
    """Relay between ``app`` (plain TCP) and ``peer`` (TLS through memory BIOs) until
    one side ends; the same contract as :func:`relay`.

    App -> peer: one ``recv_into`` of up to TLS_CHUNK, encrypted at once (several
    records), sent with one ``send``. Peer -> app: one ``recv_into`` of ciphertext (any
    number of records), decrypted record by record into one buffer, one ``send``.
    """
    raw = peer.raw
    app.setblocking(False)
    raw.setblocking(False)
    with counters.lock:
        counters.bio += 1
    # app -> peer: plaintext in; peer -> app: delivered
    with counters.tracked() as (up, down):
        obj, incoming = peer.obj, peer.incoming
        inbuf = bytearray(TLS_CHUNK)  # plaintext from the app
        inview = memoryview(inbuf)
        cbuf = bytearray(TLS_CHUNK)  # ciphertext from the peer
        cview = memoryview(cbuf)
        pbuf = bytearray(TLS_CHUNK)  # plaintext for the app
        pview = memoryview(pbuf)
        pstart = pend = 0
        up_eof = down_eof = raw_eof = False
        sel = selectors.DefaultSelector()
        registered = {app: 0, raw: 0}
        try:
            while True:
                app_wants = raw_wants = 0
                # App -> peer: read only when everything encrypted so far is sent.
                while True:
                    if not peer.flush():
                        raw_wants |= selectors.EVENT_WRITE
                        break
                    if up_eof:
                        break
                    n = _recv_some(app, inview, bucket)
                    if n is None:
                        app_wants |= selectors.EVENT_READ
                        break
                    if n == 0:
                        up_eof = True
                        break
                    obj.write(inview[:n])
                    up.moved += n
                if up_eof and peer.flushed:
                    app.setblocking(True)
                    peer.close_blocking(time.monotonic() + DRAIN_TIMEOUT_S, wait_for_peer=True)
                    return True
                # Peer -> app: read ciphertext only when everything decrypted is delivered.
                while True:
                    if pstart < pend:
                        try:
                            n = app.send(pview[pstart:pend])
                        except BlockingIOError:
                            app_wants |= selectors.EVENT_WRITE
                            break
                        pstart += n
                        down.moved += n
                        continue
                    if down_eof:
                        break
                    pstart = pend = 0
                    try:
                        while pend <= TLS_CHUNK - _RECORD:
                            n = obj.read(TLS_CHUNK - pend, pview[pend:])
                            if n == 0:  # the peer's close_notify
                                down_eof = True
                                break
                            pend += n
                    except ssl.SSLWantReadError:
                        if raw_eof and not pend:
                            raise ssl.SSLEOFError("TLS hop ended without close_notify") from None
                    if pend or down_eof:
                        continue
                    n = _recv_some(raw, cview, bucket)
                    if n is None:
                        raw_wants |= selectors.EVENT_READ
                        break
                    if n == 0:
                        incoming.write_eof()  # the next read: close_notify seen, or truncation
                        raw_eof = True
                        continue
                    incoming.write(cview[:n])
                if not peer.flushed and not peer.flush():  # TLS 1.3 reads may write
                    raw_wants |= selectors.EVENT_WRITE
                if down_eof and pstart == pend:
                    app.setblocking(True)
                    peer.close_blocking(time.monotonic() + 1.0, wait_for_peer=False)
                    if down.moved == 0:
                        return False
                    app.shutdown(socket.SHUT_WR)
                    _drain(app, time.monotonic() + DRAIN_TIMEOUT_S)
                    return True
                _set_interest(sel, registered, ((app, app_wants), (raw, raw_wants)))
                sel.select()
        finally:
            sel.close()


def _recv_some(sock: socket.socket, view: memoryview, bucket: TokenBucket | None) -> int | None:
    """What a non-blocking ``sock`` has, into ``view`` (up to what ``bucket`` allows,
    paid for); None when nothing waits, 0 at its end."""
    size = len(view) if bucket is None else bucket.chunk()
    try:
        n = sock.recv_into(view[:size])
    except BlockingIOError:
        return None
    if n and bucket is not None:
        bucket.take(n)
    return n


class FramesPeer:
    """A TLS hop whose two native ends agreed on sealed frames: the raw TCP socket, the
    keys of each direction, and the bytes already received after the TLS hello."""

    __slots__ = ("raw", "seal_key", "open_key", "prefix")

    def __init__(self, raw: socket.socket, seal_key: bytes, open_key: bytes, prefix: bytes):
        self.raw, self.seal_key, self.open_key, self.prefix = raw, seal_key, open_key, prefix


def _pump_for(bucket: TokenBucket | None, counters: Counters) -> pump.Pump | None:
    """The pump to move a connection (counted), or None for a thread per direction: a
    throttled connection (its token bucket sleeps) or a relay without pumps."""
    loop = pump.pick() if bucket is None else None
    if loop is not None:
        with counters.lock:
            counters.pumped += 1
    return loop


def relay_sealed(app: socket.socket, peer: FramesPeer, bucket: TokenBucket | None,
                 counters: Counters) -> bool:
    """Relay between ``app`` (plain TCP) and ``peer`` (sealed frames), in one of the
    relay's pumps (or a thread per direction, as :func:`relay` says), until both
    directions ended in order (each end travels on by itself: a
    half-close keeps the other direction running). Returns True; raises what broke the
    connection (the caller resets both sides)."""
    with counters.lock:
        counters.frames += 1
    with counters.tracked() as (up, down):
        loop = _pump_for(bucket, counters)
        if loop is None:
            frames.relay_frames(app, peer.raw, peer.seal_key, peer.open_key, peer.prefix,
                                up, down, bucket)
        else:
            loop.relay(app, peer.raw, pump.Seal(app, peer.raw, peer.seal_key, up),
                       pump.Open(peer.raw, app, peer.open_key, peer.prefix, down))
    return True


def _set_interest(sel: selectors.BaseSelector, registered: dict[socket.socket, int],
                  wanted) -> None:
    """Make ``sel`` wait for the events each socket wants now (``(socket, events)``
    pairs; 0 = none), touching only those that changed since ``registered``."""
    for sock, events in wanted:
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


def _drain(sock: socket.socket, deadline: float) -> None:
    """Read (discarding) until ``sock`` closes or ``deadline``."""
    sink = bytearray(BUFFER_SIZE)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            if not sock.recv_into(sink):
                return
    except (OSError, ValueError):
        pass


class _Connection:
    """The sockets of one relayed connection, so that ``stop`` can cut it from another
    thread. Its thread forgets it (under the stream's lock) before closing the sockets,
    so a cut never reaches a descriptor number that was closed and reused."""

    __slots__ = ("socks", "cut")

    def __init__(self, sock: socket.socket):
        self.socks = [sock]
        self.cut = False


class Stream:
    """One stream end inside the relay: listeners, accept threads, connection threads."""

    def __init__(self, name: str, stream_dir: Path, config: dict,
                 listeners: list[socket.socket], log) -> None:
        self.name = name
        self.dir = stream_dir
        self.role = config["role"]
        self.listeners = listeners
        self.counters = Counters()
        self.bucket = TokenBucket(config["rate"]) if config.get("rate") else None
        self.handshake_timeout = float(config.get("handshake_timeout_s", 30))
        self.connect_timeout = float(config.get("connect_timeout_s", 10))
        self.cert_path = stream_dir / config["cert"]
        self.key_path = stream_dir / config["key"]
        self.targets: list[tuple[str, int]] = []
        self.context: ssl.SSLContext | None = None
        self.tls_io = "socket"
        self.peer_fingerprint = ""
        self.state = "waiting"
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connections: set[_Connection] = set()
        self.accept_threads: list[threading.Thread] = []
        self.log = log

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
            self.tls_io = tls_io_mode()
            if self.tls_io == "socket" and ktls_available() is None:
                self.context.options |= OP_ENABLE_KTLS
            if self.tls_io == "frames":
                # Offered (client) and chosen (server) only here: a C proxy never agrees,
                # and its hop runs TLS records.
                self.context.set_alpn_protocols([frames.ALPN])
                if self.role == "PROD":
                    self.context.num_tickets = 0  # nothing resumes; no record before ours
        for index, listener in enumerate(self.listeners):
            thread = threading.Thread(
                target=self._accept_loop, args=(index, listener), daemon=True,
                name=f"accept-{self.name}-{index}",
            )
            self.accept_threads.append(thread)
            thread.start()
        self.state = "running"
        return {"ok": True, "state": self.state}

    def status(self) -> dict:
        return {"ok": True, "state": self.state, "pid": os.getpid(),
                "frames_aead": frames.engine() if self.tls_io == "frames" else None,
                **self.counters.snapshot()}

    def stop(self) -> None:
        """Free the ports and cut every connection (the apps see a reset; the peer
        gateway sees its TLS hop end without close_notify: truncation)."""
        self.stopping.set()
        self.state = "stopped"
        for listener in self.listeners:
            try:  # wakes a thread blocked in accept(); the port is freed by its close
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.accept_threads:
            thread.join(timeout=5)
        for listener in self.listeners:
            listener.close()  # the accept threads closed theirs; these never ran
        with self.lock:
            for conn in self.connections:
                conn.cut = True
                for sock in conn.socks:
                    # A reset on the descriptor (never a FIN, which an app would take
                    # for a clean end); never touches an SSL object.
                    frames.reset_now(sock)

    # -- data path ------------------------------------------------------------
    def _accept_loop(self, index: int, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self.stopping.is_set():
                    break
                time.sleep(0.05)  # EMFILE and friends: back off rather than spin
                continue
            if self.stopping.is_set():
                _abort(conn)
                break
            threading.Thread(
                target=self._serve, args=(index, conn), daemon=True,
                name=f"conn-{self.name}-{index}",
            ).start()
        listener.close()

    def _secure(self, sock: socket.socket,
                server_side: bool) -> ssl.SSLSocket | TlsPeer | FramesPeer:
        """The TLS handshake on ``sock``, the peer's certificate checked against the pin;
        then, if both ends agreed on frames, their keys."""
        if self.tls_io in ("bio", "frames"):
            peer = TlsPeer.handshake(self.context, sock, server_side,  # type: ignore[arg-type]
                                     self.handshake_timeout)
            presented = peer.obj.getpeercert(binary_form=True)
        else:
            sock.settimeout(self.handshake_timeout)
            peer = self.context.wrap_socket(  # type: ignore[union-attr]
                sock, server_side=server_side, suppress_ragged_eofs=False
            )
            presented = peer.getpeercert(binary_form=True)
        if presented is None or fingerprint_of_der(presented) != self.peer_fingerprint:
            raise ssl.SSLError("peer certificate does not match the pinned fingerprint")
        if isinstance(peer, ssl.SSLSocket):
            tx, rx = ktls_engaged(peer)
            if tx or rx:
                with self.counters.lock:
                    self.counters.ktls_tx += tx
                    self.counters.ktls_rx += rx
        elif peer.obj.selected_alpn_protocol() == frames.ALPN:
            seal, open_, prefix = frames.exchange(peer.obj, sock, peer.incoming,
                                                  peer.outgoing, self.handshake_timeout)
            return FramesPeer(sock, seal, open_, prefix)
        return peer

    def _hold(self, conn: _Connection, *socks: socket.socket) -> None:
        """Record the connection's current sockets; raise if the stream was stopped."""
        with self.lock:
            conn.socks = list(socks)
            if conn.cut:
                raise ConnectionAbortedError("stream stopped")

    def _serve(self, index: int, inbound: socket.socket) -> None:
        c = self.counters
        with c.lock:
            c.total += 1
        conn = _Connection(inbound)
        with self.lock:
            self.connections.add(conn)
        orderly = False
        try:
            inbound.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = self.targets[index % len(self.targets)]
            if self.role == "PROD":
                app_side = peer_side = inbound
                if self.context is not None:
                    peer_side = self._secure(inbound, server_side=True)
                    self._hold(conn, _raw(peer_side))
                app_side = socket.create_connection(target, timeout=self.connect_timeout)
                self._hold(conn, _raw(peer_side), app_side)
                app_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                app_side = peer_side = inbound
                peer_side = socket.create_connection(target, timeout=self.connect_timeout)
                self._hold(conn, inbound, peer_side)
                peer_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.context is not None:
                    peer_side = self._secure(peer_side, server_side=False)
                    self._hold(conn, inbound, _raw(peer_side))
            if isinstance(peer_side, FramesPeer):
                orderly = relay_sealed(app_side, peer_side, self.bucket, c)
            elif isinstance(peer_side, TlsPeer):
                orderly = relay_tls(app_side, peer_side, self.bucket, c)
            else:
                orderly = relay(app_side, peer_side, self.bucket, c)
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection only
            if not conn.cut:
                with c.lock:
                    c.failed += 1
                    c.last_error = f"connection {index}: {type(exc).__name__}: {exc}"
                self.log(f"{self.name}: {c.last_error}")
        finally:
            with self.lock:
                self.connections.discard(conn)
                socks, cut = conn.socks, conn.cut
            if orderly and not cut:
                for sock in socks:
                    try:
                        sock.close()
                    except OSError:
                        pass
            else:
                _abort(*socks)


def _raw(peer: socket.socket | TlsPeer | FramesPeer) -> socket.socket:
    return peer.raw if isinstance(peer, (TlsPeer, FramesPeer)) else peer


def tls_io_mode() -> str:
    """How TLS hops move their bytes (see :data:`TLS_IO_ENV`): the environment's choice,
    else kernel TLS where the kernel has it, else frames where OpenSSL's libcrypto can be
    loaded, else OpenSSL on the socket."""
    mode = os.environ.get(TLS_IO_ENV, "")
    if mode in ("bio", "socket"):
        return mode
    if mode != "frames" and ktls_available() is None:
        return "socket"
    return "frames" if not frames.missing() else "socket"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_stream(stream_dir: Path, config: dict, listeners: list[socket.socket]) -> Stream:
    return Stream(stream_dir.name, stream_dir, config, listeners, _log)


class Relay:
    """Every native stream of one gateway; answers the control socket until the last
    stream is stopped."""

    def __init__(self, control: socket.socket):
        self.control = control
        self.streams: dict[str, Stream] = {}

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
        self.streams[name] = _load_stream(stream_dir, config, listeners)
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
