"""Event loops that move the bytes of many connections: one thread, one ``epoll``.

The relay sets up each connection in its own thread (accept, connect, TLS handshake,
frames key exchange), then hands the two sockets to a :class:`Pump`, which moves both
directions with non-blocking calls until the connection ends, while the setting-up
thread waits. With a thread per direction instead, 64 connections mean 128 threads per
relay contending for the GIL at every system call (``strace -c`` of a relay counted
about 100 ``futex`` calls per ``recv``/``send``); a pump makes the same calls from one
thread. Each direction is one of:

- :class:`Copy`: plain bytes, src -> dst, through a buffer of up to ``FRAME_MAX``;
- :class:`Splice`: plain bytes, src -> pipe -> dst with ``splice(2)``;
- :class:`Seal`: app -> peer, each read sealed into one frame (``scistream_proxy.frames``),
  the end of data as the FINAL frame;
- :class:`Open`: peer -> app, frames opened in place; nothing unauthenticated is
  delivered, and a truncation, a bad frame or data after the FINAL frame fails the
  connection.

The semantics are those of the thread-per-direction loops in ``scistream_proxy.engines``:
an end of data (FIN, or the FINAL frame) is passed on as an end of data, so each
direction ends on its own (half-close); any failure cuts both sockets with a reset
(``engines.reset_now``), never a FIN, and is raised in the setting-up thread. A cut from
outside (``Stream.stop`` resets the sockets) shows up here as an error or an end on
the socket and ends the connection the same way.

A direction reads only when its buffer is empty and writes what it holds as the
destination takes it (``EPOLLOUT``), so a slow receiver holds back its sender through
TCP flow control, as a blocking relay would. Buffers (1 MiB) come from the pump's
:class:`Pool` and are held only while they hold bytes, so memory follows the
connections holding data at one moment, not the connections open. Throttled
connections (a token bucket sleeps) keep the thread-per-direction loops.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import threading

from scistream_proxy import frames
from scistream_proxy.engines import reset_now
from scistream_proxy.frames import FINAL, FRAME_MAX, HEADER, TAG, FrameError
from scistream_proxy.limits import Moved

# A pump moves this many connections copied; from then on it splices them (see
# docs/native.md: one connection moved faster copied, 64 moved faster spliced, at half
# the CPU per GB).
SPLICE_FROM = 8
# Rounds of read-then-write one direction makes per wake-up before the loop moves on
# to other connections (fairness between busy connections).
_ROUNDS = 4
# A frame longer than this is waited for whole: the socket's receive low-water mark
# (SO_RCVLOWAT, up to _LOWAT_MAX) keeps epoll from waking the pump for each piece of it
# (1 connection: 1.38 -> 1.29 CPU s/GB for both relays in one quick run).
_LOWAT_MIN = 128 * 1024
_LOWAT_MAX = 512 * 1024
# A pipe of Splice: splice(2) moves at most this much per call.
PIPE_SIZE = 1 << 20
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


class Spares:
    """Things a pump's directions hold only while bytes sit in them (frame buffers,
    pipes): taken when needed, given back when empty, so the pump's memory follows how
    many connections hold data at once, not how many are open. Up to ``keep`` given back
    are kept for reuse; more are discarded (after a burst, memory goes back)."""

    def __init__(self, make, discard, keep: int = 8):
        self.make, self.discard, self.keep = make, discard, keep
        self.free: list = []  # append/pop: atomic, no lock needed

    def take(self):
        try:
            return self.free.pop()
        except IndexError:
            return self.make()

    def give(self, item, reusable: bool = True) -> None:
        """Give ``item`` back; one that is not ``reusable`` (bytes may sit in it) is
        discarded."""
        if reusable and len(self.free) < self.keep:
            self.free.append(item)
        else:
            self.discard(item)


def _new_buffer() -> frames._Buffer:
    return frames._Buffer(HEADER + FRAME_MAX + TAG)


def _free_buffer(buf: frames._Buffer) -> None:
    try:
        buf.close()
    except BufferError:  # a view still exists somewhere: unmapped when it goes
        pass


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:  # 64 KiB by default; past the user's pipe-user-pages-soft it stays so
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return r, w


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        os.close(fd)


class Pool:
    """A pump's spare frame buffers (every direction but :class:`Splice`) and pipes
    (:class:`Splice`)."""

    def __init__(self, keep: int = 8):
        self.buffers = Spares(_new_buffer, _free_buffer, keep)
        self.pipes = Spares(_new_pipe, _close_pipe, keep)


class Direction:
    """One direction of a connection: src -> dst. ``step`` moves what it can without
    blocking and returns; ``done`` once the end of data was passed on in order. The
    pump sets ``pool`` before the first step."""

    __slots__ = ("src", "dst", "moved", "pool", "buf", "view", "off", "end", "done")

    def __init__(self, src: socket.socket, dst: socket.socket, moved: Moved):
        self.src, self.dst, self.moved = src, dst, moved
        self.pool: Pool | None = None
        self.buf: frames._Buffer | None = None  # held from the pool while in use
        self.view: memoryview | None = None
        self.off = self.end = 0  # bytes [off:end] of the buffer wait to be sent
        self.done = False

    def wants_read(self) -> bool:
        return not self.done and self.off == self.end

    def wants_write(self) -> bool:
        return self.off < self.end

    def hold(self) -> memoryview:
        """The buffer, taken from the pool unless held already."""
        if self.buf is None:
            self.buf = self.pool.buffers.take()
            self.view = self.buf.view
        return self.view

    def drop(self) -> None:
        """Give the buffer back (nothing in it is needed any more)."""
        if self.buf is not None:
            buf, self.buf, self.view = self.buf, None, None
            self.pool.buffers.give(buf)

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left."""
        while self.off < self.end:
            try:
                n = self.dst.send(self.view[self.off:self.end])
            except BlockingIOError:
                return False
            self.off += n
        self.off = self.end = 0
        return True

    def pass_end(self) -> None:
        """The source ended in order: end dst's sending side (a FIN) and this direction."""
        self.drop()
        self.dst.shutdown(socket.SHUT_WR)
        self.done = True

    def deliver(self) -> bool:
        """:meth:`flush`, counting what was sent as moved (pending bytes are the app's)."""
        pending = self.end - self.off
        flushed = self.flush()
        self.moved.moved += pending - (self.end - self.off)
        return flushed

    def step(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.pool is not None:
            self.drop()


class Copy(Direction):
    """Plain bytes, src -> dst; the end of data passed on as a FIN."""

    __slots__ = ()

    def step(self) -> None:
        for _ in range(_ROUNDS):
            if not self.deliver():
                return
            view = self.hold()
            try:
                n = self.src.recv_into(view[:FRAME_MAX])
            except BlockingIOError:
                self.drop()
                return
            if not n:
                self.pass_end()
                return
            self.end = n


class Splice(Direction):
    """Plain bytes, src -> pipe -> dst with splice(2): the bytes never enter user space
    (the pipe takes the socket's pages and hands them on); the end passed on as a FIN.
    ``end`` counts the bytes in the pipe; src is read when the pipe is empty (filling
    it while it drains measured slower: more, smaller splices)."""

    __slots__ = ("pipe",)

    def __init__(self, src: socket.socket, dst: socket.socket, moved: Moved):
        super().__init__(src, dst, moved)
        self.pipe: tuple[int, int] | None = None

    def step(self) -> None:
        src, dst, pipes = self.src.fileno(), self.dst.fileno(), self.pool.pipes
        for _ in range(_ROUNDS):
            while self.end:
                try:
                    n = os.splice(self.pipe[0], dst, self.end, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return
                self.end -= n
                self.moved.moved += n
            if self.pipe is None:
                self.pipe = pipes.take()
            try:
                n = os.splice(src, self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                pipes.give(self.pipe)
                self.pipe = None
                return
            if not n:
                pipes.give(self.pipe)
                self.pipe = None
                self.pass_end()
                return
            self.end = n

    def close(self) -> None:
        if self.pipe is not None:  # bytes may still sit in it: never reused
            self.pool.pipes.give(self.pipe, reusable=not self.end)
            self.pipe = None


class Seal(Direction):
    """App -> peer: each read sealed in place into one frame; the app's end of data
    becomes the FINAL frame, then the end of the TCP stream's sending side."""

    __slots__ = ("cipher", "last", "sealed")

    def __init__(self, app: socket.socket, raw: socket.socket, secret: bytes, moved: Moved):
        super().__init__(app, raw, moved)
        self.cipher = frames.Cipher(secret, encrypt=True)
        self.last = False  # the FINAL frame is pending
        self.sealed = 0  # plaintext bytes of the pending frame

    def step(self) -> None:
        for _ in range(_ROUNDS):
            if not self.flush():
                return
            self.moved.moved += self.sealed
            self.sealed = 0
            if self.last:
                self.pass_end()
                return
            view = self.hold()
            try:
                n = self.src.recv_into(view[HEADER:HEADER + FRAME_MAX])
            except BlockingIOError:
                self.drop()
                return
            struct.pack_into(">I", self.buf.mem, 0, n if n else FINAL)
            self.cipher.run(self.buf, n)
            self.end, self.sealed, self.last = HEADER + n + TAG, n, not n

class Open(Direction):
    """Peer -> app: frames read whole (in as many reads as they arrive), opened in place
    and delivered; the FINAL frame followed by the end of the TCP stream is passed on
    as the app's end of data."""

    __slots__ = ("cipher", "got", "need", "final", "lowat")

    def __init__(self, raw: socket.socket, app: socket.socket, secret: bytes, moved: Moved):
        super().__init__(raw, app, moved)
        self.cipher = frames.Cipher(secret, encrypt=False)
        self.got, self.need = 0, HEADER  # of the frame being read
        self.final = False  # the FINAL frame arrived; the TCP stream must end next
        self.lowat = False

    def _read(self, view: memoryview) -> int:
        n = self.src.recv_into(view)  # BlockingIOError: the caller waits
        if not n:
            raise FrameError("the TLS hop ended inside a frame (truncation)" if self.got
                             else "the TLS hop ended without its end frame (truncation)")
        return n

    def step(self) -> None:
        for _ in range(_ROUNDS * 4):  # a frame may arrive in several reads
            if not self.deliver():
                return
            view = self.hold()
            try:
                if self.final:
                    if self.src.recv_into(view[:1]):
                        raise FrameError("data after the end frame")
                    self.pass_end()
                    return
                self.got += self._read(view[self.got:self.need])
            except BlockingIOError:
                if not self.got:  # between frames: nothing to keep
                    self.drop()
                elif self.lowat:
                    # Part of the frame was read: a mark above what is left of it would
                    # never be reached, and the connection would stall.
                    self.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT,
                                        min(self.need - self.got, _LOWAT_MAX))
                return
            if self.got < self.need:
                continue
            if self.need == HEADER:
                word = struct.unpack_from(">I", self.buf.mem, 0)[0]
                final, n = word & FINAL, word & ~FINAL
                if n > FRAME_MAX or (final and n):
                    raise FrameError(f"malformed frame header {word:#010x}")
                self.need = HEADER + n + TAG
                if n > _LOWAT_MIN:
                    self.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT,
                                        min(self.need - self.got, _LOWAT_MAX))
                    self.lowat = True
                continue
            n = self.need - HEADER - TAG
            self.cipher.run(self.buf, n)
            self.got, self.need = 0, HEADER
            if self.lowat:
                self.src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                self.lowat = False
            if struct.unpack_from(">I", self.buf.mem, 0)[0] & FINAL:
                self.final = True
            else:
                self.off, self.end = HEADER, HEADER + n


class _Connection:
    __slots__ = ("a", "b", "forward", "backward", "finished", "error", "masks")

    def __init__(self, a: socket.socket, b: socket.socket, forward: Direction,
                 backward: Direction):
        self.a, self.b = a, b
        self.forward, self.backward = forward, backward  # a -> b, b -> a
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.masks = {a.fileno(): 0, b.fileno(): 0}

    def reading(self, fd: int) -> Direction:
        return self.forward if fd == self.forward.src.fileno() else self.backward

    def writing(self, fd: int) -> Direction:
        return self.forward if fd == self.forward.dst.fileno() else self.backward


class Pump:
    """One event-loop thread moving the bytes of the connections handed to it."""

    def __init__(self, name: str):
        self.name = name
        self.pool = Pool()
        self.epoll = select.epoll()
        self.conns: dict[int, _Connection] = {}  # by file descriptor (both of each)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def load(self) -> int:
        """How many connections this pump moves now."""
        return len(self.conns) // 2

    def relay(self, a: socket.socket, b: socket.socket, forward: Direction,
              backward: Direction) -> None:
        """Move ``forward`` (a -> b) and ``backward`` (b -> a) until both ended in order;
        raise the first failure (both sockets are cut then). Blocks the calling thread."""
        a.setblocking(False)
        b.setblocking(False)
        forward.pool = backward.pool = self.pool
        conn = _Connection(a, b, forward, backward)
        try:
            try:  # here, before the pump sees it: what already waits moves at once
                forward.step()
                backward.step()
            except BaseException as exc:  # noqa: BLE001 - raised below, after the cut
                conn.error = exc.with_traceback(None)  # (see _end)
                reset_now(b)
                reset_now(a)
            if conn.error is None and not (forward.done and backward.done):
                for sock in (a, b):
                    fd = sock.fileno()
                    conn.masks[fd] = _mask(conn, fd)
                    self.epoll.register(fd, conn.masks[fd])
                # Only now the pump acts on their events (until now it skipped them,
                # and epoll reports them again): both are registered when it does.
                for sock in (a, b):
                    self.conns[sock.fileno()] = conn
                conn.finished.wait()
        finally:
            self._forget(a, b)  # (if registering failed halfway; else done already)
            forward.close()
            backward.close()
            a.setblocking(True)
            b.setblocking(True)
        if conn.error is not None:
            raise conn.error

    def _forget(self, *socks: socket.socket) -> None:
        """The pump no longer acts on ``socks`` (those it never knew are skipped)."""
        for sock in socks:
            fd = sock.fileno()
            self.conns.pop(fd, None)
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def _end(self, conn: _Connection, error: BaseException | None) -> None:
        self._forget(conn.a, conn.b)
        if error is not None:
            # Without its traceback: the frames it holds would hold views of the
            # connection's buffers, which the relaying thread is about to free.
            conn.error = error.with_traceback(None)
            reset_now(conn.b)  # the peer first: nothing may look like an orderly end
            reset_now(conn.a)
        conn.finished.set()

    def _loop(self) -> None:
        poll, conns = self.epoll.poll, self.conns
        while True:
            for fd, events in poll():
                conn = conns.get(fd)
                if conn is None:  # ended earlier in this round, or not yet published
                    continue
                try:
                    if events & (_IN | _GONE):
                        reading = conn.reading(fd)
                        if not reading.done:
                            reading.step()
                    if events & (_OUT | _GONE):
                        writing = conn.writing(fd)
                        if not writing.done:
                            writing.step()
                    if events & _GONE and not conn.writing(fd).done and conn.reading(fd).done:
                        # Nothing more comes from this socket and it takes nothing:
                        # what is still to be sent to it can never arrive.
                        raise ConnectionResetError(
                            f"the other end went away ({_why(conn, fd)})")
                    if conn.forward.done and conn.backward.done:
                        self._end(conn, None)
                    else:
                        self._update(conn)
                except BaseException as exc:  # noqa: BLE001 - raised in the relaying thread
                    self._end(conn, exc)

    def _update(self, conn: _Connection) -> None:
        for sock in (conn.a, conn.b):
            fd = sock.fileno()
            mask = _mask(conn, fd)
            if mask != conn.masks[fd]:
                conn.masks[fd] = mask
                self.epoll.modify(fd, mask)


def _mask(conn: _Connection, fd: int) -> int:
    """The events a connection waits for on ``fd``: readable when the direction reading
    it has room, writable when the direction writing it holds bytes."""
    return (_IN if conn.reading(fd).wants_read() else 0) | \
        (_OUT if conn.writing(fd).wants_write() else 0)


def _why(conn: _Connection, fd: int) -> str:
    sock = conn.a if conn.a.fileno() == fd else conn.b
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return os.strerror(error) if error else "hung up"


_pumps: list[Pump] = []
_next = 0
_lock = threading.Lock()


def count() -> int:
    """How many pumps a relay runs: half the cores it may use (the kernel's TCP work for
    the same bytes needs the rest), at least 1, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def pick() -> Pump:
    """The pump for the next connection (round robin)."""
    global _next
    with _lock:
        if not _pumps:
            for i in range(count()):
                _pumps.append(Pump(f"pump-{i}"))
        _next = (_next + 1) % len(_pumps)
        return _pumps[_next]
