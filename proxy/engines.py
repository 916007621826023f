"""The byte-moving engines besides the pumps (``scistream_proxy.pump``): a thread per
direction (throttled connections: their token bucket sleeps) for sealed frames and plain
copies, and the TLS-records loop (a C proxy at the other gateway, or kernel TLS); plus
the reset that cuts a connection.

Ends: on the per-direction paths each direction ends by itself (a FIN or the end frame
travels on after every byte; the other direction keeps running, as over one TCP
connection). On the TLS-records path the first end ends the connection in order:
everything already received is delivered, the end is signalled (FIN, TLS close_notify)
and the other side is drained until it closes. A TLS hop that ends without its end
(close_notify, the end frame) is a truncation: the app side is reset, never closed
cleanly. A broken connection is cut with a reset on both sides (:func:`reset_now`).
"""

from __future__ import annotations

import ctypes
import selectors
import socket
import ssl
import struct
import threading
import time

from scistream_proxy import frames
from scistream_proxy.frames import FINAL, FRAME_MAX, HEADER, TAG, FrameError
from scistream_proxy.limits import Counters, Moved, TokenBucket

# The TLS-records loop's buffer per direction.
BUFFER_SIZE = 64 * 1024
_RECORD = 16 * 1024  # the largest TLS record's plaintext
# How long an ended connection waits for its peer to close before it is cut.
DRAIN_TIMEOUT_S = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_UNSPEC = (ctypes.c_ubyte * 16)()  # a sockaddr whose family is AF_UNSPEC (0)


def reset_now(sock: socket.socket) -> None:
    """Abort ``sock``'s TCP connection at once: the other end gets a reset (never a FIN,
    which an app would take for a clean end of data), and a thread blocked in a recv or
    a send on it returns with an error. That is connect(2) with an AF_UNSPEC address,
    which Linux defines as dissolving the association (tcp_disconnect). The descriptor
    stays open for its owner to close."""
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return
    if fd < 0:
        return
    if _libc.connect(fd, _UNSPEC, ctypes.sizeof(_UNSPEC)) != 0:
        try:  # not a connected TCP socket any more; at least wake its threads
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _cut(*socks: socket.socket) -> None:
    for sock in socks:
        reset_now(sock)


def seal_loop(app: socket.socket, raw: socket.socket, secret: bytes, moved: Moved,
              bucket=None, broken: threading.Event | None = None) -> None:
    """App -> peer: read what the app sent (up to FRAME_MAX at once), seal it in place,
    send it as one frame; at the app's end of data, send the FINAL frame and end the
    TCP stream's sending side."""
    cipher = frames.Cipher(secret, encrypt=True)
    buf = frames._Buffer(HEADER + FRAME_MAX + TAG)
    view = buf.view
    try:
        while True:
            size = FRAME_MAX if bucket is None else bucket.chunk()
            n = app.recv_into(view[HEADER:HEADER + size])
            if bucket is not None and n:
                bucket.take(n)
            if not n and broken is not None and broken.is_set():
                raise FrameError("the connection broke: no end frame")
            struct.pack_into(">I", buf.mem, 0, n if n else FINAL)
            cipher.run(buf, n)
            raw.sendall(view[:HEADER + n + TAG])
            if not n:
                raw.shutdown(socket.SHUT_WR)
                return
            moved.moved += n
    finally:
        del view
        buf.close()


def _fill(raw: socket.socket, view: memoryview) -> int:
    """Fill ``view`` completely; returns how much arrived before the stream ended."""
    got = 0
    while got < len(view):
        # The sender sends a frame whole: wait for all of it in one call (one wake-up
        # instead of one per segment that arrives).
        n = raw.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if not n:
            break
        got += n
    return got


def open_loop(raw: socket.socket, app: socket.socket, secret: bytes, moved: Moved,
              bucket=None) -> None:
    """Peer -> app: read a frame, open it in place, deliver the plaintext; at the FINAL
    frame end the app's side (FIN) once the TCP stream ends too. Raises FrameError on a
    truncation or any frame that does not authenticate; nothing unauthenticated is ever
    delivered."""
    cipher = frames.Cipher(secret, encrypt=False)
    buf = frames._Buffer(HEADER + FRAME_MAX + TAG)
    view = buf.view
    try:
        while True:
            got = _fill(raw, view[:HEADER])
            if got < HEADER:
                raise FrameError("the TLS hop ended without its end frame (truncation)")
            word = struct.unpack_from(">I", buf.mem, 0)[0]
            final, n = word & FINAL, word & ~FINAL
            if n > FRAME_MAX or (final and n):
                raise FrameError(f"malformed frame header {word:#010x}")
            if _fill(raw, view[HEADER:HEADER + n + TAG]) < n + TAG:
                raise FrameError("the TLS hop ended inside a frame (truncation)")
            cipher.run(buf, n)
            if final:
                if _fill(raw, view[:1]):
                    raise FrameError("data after the end frame")
                app.shutdown(socket.SHUT_WR)
                return
            if bucket is not None:
                bucket.take(n)
            app.sendall(view[HEADER:HEADER + n])
            moved.moved += n
    finally:
        del view
        buf.close()


def copy_loop(src: socket.socket, dst: socket.socket, moved: Moved, bucket=None,
              broken: threading.Event | None = None) -> None:
    """One direction of a plain connection: src -> dst through one buffer of up to
    FRAME_MAX, then pass the end on (FIN) unless the connection broke."""
    buf = frames._Buffer(FRAME_MAX)
    view = buf.view
    try:
        while True:
            size = FRAME_MAX if bucket is None else bucket.chunk()
            n = src.recv_into(view[:size])
            if not n:
                if broken is not None and broken.is_set():
                    raise ConnectionAbortedError("the connection broke: no end passed on")
                dst.shutdown(socket.SHUT_WR)
                return
            if bucket is not None:
                bucket.take(n)
            dst.sendall(view[:n])
            moved.moved += n
    finally:
        del view
        buf.close()


def both_directions(app: socket.socket, peer: socket.socket, forward, backward) -> None:
    """Run ``forward(broken)`` (app -> peer) here and ``backward(broken)`` (peer -> app) in
    a second thread, both on blocking sockets, until both ended in order. A failure in
    either sets ``broken`` (so the other passes no end on) and cuts both sockets (so it
    stops at once), and is raised here; the first error is the cause."""
    app.settimeout(None)
    peer.settimeout(None)
    errors: list[BaseException] = []
    broken = threading.Event()

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        broken.set()
        _cut(peer, app)  # the peer first: nothing may look like an orderly end there

    def run_backward() -> None:
        try:
            backward(broken)
        except BaseException as exc:  # noqa: BLE001 - handed to this thread
            fail(exc)

    thread = threading.Thread(target=run_backward, daemon=True,
                              name=threading.current_thread().name + "-back")
    thread.start()
    try:
        forward(broken)
    except BaseException as exc:  # noqa: BLE001 - raised below, after the join
        fail(exc)
    thread.join()
    if errors:
        raise errors[0]


def relay_frames(app: socket.socket, raw: socket.socket, seal_secret: bytes,
                 open_secret: bytes, up: Moved, down: Moved, bucket=None) -> None:
    """Both directions of one connection over sealed frames (this thread seals, a
    second opens); see :func:`both_directions`."""
    both_directions(
        app, raw,
        lambda broken: seal_loop(app, raw, seal_secret, up, bucket, broken),
        lambda broken: open_loop(raw, app, open_secret, down, bucket),
    )


def relay_plain(a: socket.socket, b: socket.socket, up: Moved, down: Moved,
                bucket=None) -> None:
    """Both directions of a plain connection, a thread each; see :func:`both_directions`."""
    both_directions(
        a, b,
        lambda broken: copy_loop(a, b, up, bucket, broken),
        lambda broken: copy_loop(b, a, down, bucket, broken),
    )


class _Half:
    """One direction of a relayed connection: src -> dst through a reused buffer."""

    __slots__ = ("src", "dst", "buf", "view", "start", "end", "eof", "wait", "moved", "bucket",
                 "coalesce")

    def __init__(self, src: socket.socket, dst: socket.socket, moved: Moved,
                 bucket: TokenBucket | None):
        self.src, self.dst = src, dst
        self.coalesce = isinstance(src, ssl.SSLSocket)
        self.buf = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.eof = False
        self.wait: tuple[socket.socket, int] | None = None
        self.moved = moved
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
                self.moved.moved += n
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


def abort(*socks: socket.socket) -> None:
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


def relay_records(app: socket.socket, peer: ssl.SSLSocket, bucket: TokenBucket | None,
                  counters: Counters) -> bool:
    """Relay between ``app`` (plain TCP) and ``peer`` (TLS records, OpenSSL on the
    socket, or the kernel's TLS) in this thread until the first side ends, counting
    bytes live. Returns True when the connection ended in order (both sockets may be
    closed normally), False when the caller must reset them. Raises whatever the
    sockets raise (reset, TLS truncation); the caller resets both."""
    app.setblocking(False)
    peer.setblocking(False)
    sel = selectors.DefaultSelector()
    registered: dict[socket.socket, int] = {}
    with counters.tracked() as (up, down):
        halves = (_Half(app, peer, up, bucket), _Half(peer, app, down, bucket))
        try:
            while True:
                for half in halves:
                    half.run()
                for half in halves:
                    if half.finished:
                        app.setblocking(True)
                        peer.setblocking(True)
                        return _finish(half.src, half.dst, delivered=half.moved.moved > 0)
                wanted: dict[socket.socket, int] = {app: 0, peer: 0}
                for half in halves:
                    if half.wait is not None:
                        wanted[half.wait[0]] |= half.wait[1]
                _set_interest(sel, registered, wanted.items())
                sel.select()
        finally:
            sel.close()


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
