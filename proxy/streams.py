"""A stream end inside the relay: its listeners, and each connection's set-up (accept,
connect, the pinned TLS handshake, the frames key exchange), handed then to the engine
that moves its bytes.

Roles: a ``PROD`` stream accepts TLS from the peer gateway and connects in plain TCP to
the producer app; a ``CONS`` stream accepts plain TCP from the consumer app and connects
over TLS to the peer gateway. Connection *i* of listener *i* goes to ``targets[i % n]``.

How a connection moves its bytes (docs/native.md has the figures):

- TLS between two native relays (where the kernel has no TLS): the pinned TLS 1.3
  handshake, then sealed frames (:mod:`scistream_proxy.frames`), moved by a pump;
- TLS with any other peer, or where the kernel has TLS: TLS records with OpenSSL on the
  socket (kernel TLS where it engages), one thread owning both sockets, so an SSL
  object is never used by two threads at once (OpenSSL forbids it; TLS 1.3 reads can
  write);
- plain TCP on both sides: moved by a pump, copied while the pump moves few
  connections, spliced beyond (:data:`scistream_proxy.pump.SPLICE_FROM`).

A throttled connection (its token bucket sleeps) is moved by a thread per direction
(:mod:`scistream_proxy.engines`) instead of a pump.

Bounds (the WAN side faces the internet; docs/native.md, "Under a flood"): a stream
holds at most ``conn_per_listener`` connections per listener (16 at least), set-up
included; inbound TLS handshakes not yet authenticated are at most a quarter of
``max_pending_handshakes`` per stream and ``max_pending_handshakes`` per relay, each
finished within ``handshake_timeout_s`` as a whole. At a cap the stream stops accepting
until a slot frees, and the kernel's bounded backlog holds what arrives meanwhile.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from pathlib import Path

from scistream_proxy import engines, frames, pump
from scistream_proxy.addresses import parse_address
from scistream_proxy.ktls import OP_ENABLE_KTLS, ktls_available, ktls_engaged
from scistream_proxy.limits import Counters, Slots, TokenBucket, conn_cap
from scistream_proxy.tls import fingerprint_of_der, pinned_context


# The defaults of the gateway settings of the same names (docs/operator.md).
HANDSHAKE_TIMEOUT_S = 5
MAX_PENDING_HANDSHAKES = 64
CONN_PER_LISTENER = 4
# Connections that never authenticate are logged as one summary line per stream at most
# this often (an attacker's connections must not fill the log); status counts them all.
SUMMARY_INTERVAL_S = 60.0


class FramesPeer:
    """A TLS hop whose two native ends agreed on sealed frames: the raw TCP socket and
    the traffic secret of each direction."""

    __slots__ = ("raw", "seal_secret", "open_secret")

    def __init__(self, raw: socket.socket, seal_secret: bytes, open_secret: bytes):
        self.raw, self.seal_secret, self.open_secret = raw, seal_secret, open_secret


def _move(app: socket.socket, peer: socket.socket | FramesPeer, bucket: TokenBucket | None,
          counters: Counters) -> bool:
    """Move a set-up connection's bytes until it ends, with the engine its kind takes.
    Returns True when it ended in order (both sockets may be closed normally), False
    when the caller must reset them; raises what broke it (the caller resets both)."""
    if isinstance(peer, ssl.SSLSocket):
        return engines.relay_records(app, peer, bucket, counters)
    sealed = isinstance(peer, FramesPeer)
    if sealed:
        counters.count("frames")
    with counters.tracked() as (up, down):
        if bucket is not None:
            if sealed:
                engines.relay_frames(app, peer.raw, peer.seal_secret, peer.open_secret, up,
                                     down, bucket)
            else:
                engines.relay_plain(app, peer, up, down, bucket)
            return True
        loop = pump.pick()
        counters.count("pumped")
        if sealed:
            loop.relay(app, peer.raw, pump.Seal(app, peer.raw, peer.seal_secret, up),
                       pump.Open(peer.raw, app, peer.open_secret, down))
        else:
            kind = pump.Splice if loop.load() >= pump.SPLICE_FROM else pump.Copy
            if kind is pump.Splice:
                counters.count("spliced")
            loop.relay(app, peer, kind(app, peer, up), kind(peer, app, down))
    return True


class _Connection:
    """The sockets of one relayed connection, so that ``stop`` can cut it from another
    thread. Its thread forgets it (under the stream's lock) before closing the sockets,
    so a cut never reaches a descriptor number that was closed and reused."""

    __slots__ = ("socks", "cut")

    def __init__(self, sock: socket.socket):
        self.socks = [sock]
        self.cut = False


class Stream:
    """One stream end inside the relay: listeners, accept threads, connection threads.
    ``pending`` bounds the inbound handshakes of every stream of the relay."""

    def __init__(self, name: str, stream_dir: Path, config: dict,
                 listeners: list[socket.socket], log, pending: Slots) -> None:
        self.name = name
        self.dir = stream_dir
        self.role = config["role"]
        self.listeners = listeners
        self.counters = Counters()
        self.bucket = TokenBucket(config["rate"]) if config.get("rate") else None
        self.handshake_timeout = float(config.get("handshake_timeout_s", HANDSHAKE_TIMEOUT_S))
        self.connect_timeout = float(config.get("connect_timeout_s", 10))
        self.slots = Slots(conn_cap(config.get("conn_per_listener", CONN_PER_LISTENER),
                                    len(listeners)))
        # A quarter of the relay's: one flooded stream leaves the rest to the others.
        self.pending = Slots(max(pending.size // 4, 1))
        self.relay_pending = pending
        # The summary's window (its start, and the totals then) and when the next is due.
        self.summary = (time.monotonic(), 0, 0, 0)
        self.summary_due = 0.0
        self.cert_path = stream_dir / config["cert"]
        self.key_path = stream_dir / config["key"]
        self.targets: list[tuple[str, int]] = []
        self.context: ssl.SSLContext | None = None
        self.frames = False  # TLS hops offer sealed frames (else: kernel TLS)
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
            # Where the kernel does TLS, records on the socket hand it the record layer;
            # elsewhere two native relays agree on sealed frames (docs/native.md).
            self.frames = ktls_available() is not None
            if not self.frames:
                self.context.options |= OP_ENABLE_KTLS
            else:
                # Offered (client) and chosen (server) only here: a C proxy never agrees,
                # and its hop runs TLS records. So does a peer offering only another
                # version of frames: the server selects no ALPN (OpenSSL's client refuses
                # one it did not offer), and no frames of an unknown version are spoken.
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
                "frames_aead": "cryptography" if self.frames else None,
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
                    engines.reset_now(sock)

    # -- data path ------------------------------------------------------------
    def _inbound_tls(self) -> bool:
        """Whether accepted connections start with a TLS handshake (the WAN side)."""
        return self.role == "PROD" and self.context is not None

    def _accept_loop(self, index: int, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self.stopping.is_set():
                    break
                time.sleep(0.05)  # EMFILE and friends: back off rather than spin
                continue
            # This loop accepts nothing more until the connection has its slots: at a
            # cap, what arrives waits in the kernel's backlog (bounded by listen(2) and
            # somaxconn) at no cost to the relay, and the accepted one waits here. A
            # reset instead would cost the relay an accept per attacker retry (CPU the
            # pumps of other streams need) and turn away the real peer's connections
            # queued behind the attacker's; slots free within handshake_timeout_s.
            held = self._admit()
            if held is None:
                engines.abort(conn)
                break
            try:
                threading.Thread(
                    target=self._serve, args=(index, conn, held), daemon=True,
                    name=f"conn-{self.name}-{index}",
                ).start()
            except RuntimeError:  # no thread to be had: this connection only
                engines.abort(conn)
                self._give(held)
        listener.close()

    def _admit(self) -> list[Slots] | None:
        """The slots a new connection holds: one of the stream's connections and, for an
        inbound handshake, a pending one of the stream and one of the relay. Waits while
        a cap is reached; None once the stream stops."""
        wanted = [self.slots]
        if self._inbound_tls():
            wanted += [self.pending, self.relay_pending]
        held: list[Slots] = []
        capped = False
        for slots in wanted:
            if not slots.try_take():
                if not capped:
                    capped = True
                    self._unauthenticated("capped")
                if not slots.take(self.stopping):
                    self._give(held)
                    return None
            held.append(slots)
        return held

    @staticmethod
    def _give(held: list[Slots]) -> None:
        while held:
            held.pop().give()

    def _unauthenticated(self, what: str) -> None:
        """Count an inbound connection that did not authenticate (``handshakes_refused``,
        ``handshakes_timed_out``) or a cap reached (``capped``); log a summary of them
        at most once per :data:`SUMMARY_INTERVAL_S`."""
        c = self.counters
        now = time.monotonic()
        with c.lock:
            setattr(c, what, getattr(c, what) + 1)
            if now < self.summary_due:
                return
            totals = (c.handshakes_refused, c.handshakes_timed_out, c.capped)
            since, *before = self.summary
            self.summary, self.summary_due = (now, *totals), now + SUMMARY_INTERVAL_S
        refused, timed_out, capped = (t - b for t, b in zip(totals, before, strict=True))
        self.log(f"{self.name}: not authenticated in the last {now - since:.0f} s: "
                 f"{refused} handshakes refused, {timed_out} timed out; a cap was reached "
                 f"{capped} times (this stream's totals are in its status)")

    def _secure(self, sock: socket.socket, server_side: bool,
                hold) -> ssl.SSLSocket | FramesPeer:
        """The TLS handshake on ``sock`` (``hold(tls)`` first, so that ``stop`` can cut
        it), the peer's certificate checked against the pin; then, if both ends agreed
        on frames, their traffic secrets. All of it within ``handshake_timeout``."""
        deadline = time.monotonic() + self.handshake_timeout
        tls = self.context.wrap_socket(  # type: ignore[union-attr]
            sock, server_side=server_side, suppress_ragged_eofs=False,
            do_handshake_on_connect=False,
        )
        hold(tls)
        _handshake(tls, deadline)
        presented = tls.getpeercert(binary_form=True)
        if presented is None or fingerprint_of_der(presented) != self.peer_fingerprint:
            raise ssl.SSLError("peer certificate does not match the pinned fingerprint")
        if tls.selected_alpn_protocol() == frames.ALPN:
            seal_secret, open_secret = frames.exchange(
                tls, max(deadline - time.monotonic(), 0.001))
            # The SSL object goes without a word (no close_notify): frames follow.
            return FramesPeer(socket.socket(fileno=tls.detach()), seal_secret, open_secret)
        tx, rx = ktls_engaged(tls)
        if tx or rx:
            with self.counters.lock:
                self.counters.ktls_tx += tx
                self.counters.ktls_rx += rx
        return tls

    def _hold(self, conn: _Connection, *socks: socket.socket) -> None:
        """Record the connection's current sockets; raise if the stream was stopped."""
        with self.lock:
            conn.socks = list(socks)
            if conn.cut:
                raise ConnectionAbortedError("stream stopped")

    def _serve(self, index: int, inbound: socket.socket, held: list[Slots]) -> None:
        """Set up and move one accepted connection, holding ``held`` (see ``_admit``):
        the pending slots until it authenticated, the connection's until it ends."""
        c = self.counters
        conn = _Connection(inbound)
        with self.lock:
            self.connections.add(conn)
        orderly = unauthenticated = False
        try:
            inbound.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = self.targets[index % len(self.targets)]
            peer_side: socket.socket | ssl.SSLSocket | FramesPeer = inbound
            if self._inbound_tls():
                try:
                    peer_side = self._secure(inbound, True, lambda tls: self._hold(conn, tls))
                except Exception as exc:  # noqa: BLE001 - anyone on the WAN gets here
                    # Counted, never logged one by one, nor as a failed connection (a
                    # stranger must not make the stream's status CONN_ERROR); the last
                    # reason is kept for status.
                    unauthenticated = True
                    if not conn.cut:
                        with c.lock:
                            c.last_error = (f"connection {index}: handshake refused: "
                                            f"{type(exc).__name__}: {exc}")
                        self._unauthenticated("handshakes_timed_out" if isinstance(
                            exc, TimeoutError) else "handshakes_refused")
                    raise
                finally:
                    while len(held) > 1:  # the pending slots; the connection's stays
                        held.pop().give()
            with c.lock:
                c.total += 1
            if self.role == "PROD":
                self._hold(conn, _raw(peer_side))
                app_side = socket.create_connection(target, timeout=self.connect_timeout)
                self._hold(conn, _raw(peer_side), app_side)
                app_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                app_side = inbound
                peer_side = socket.create_connection(target, timeout=self.connect_timeout)
                self._hold(conn, inbound, peer_side)
                peer_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.context is not None:
                    peer_side = self._secure(peer_side, False,
                                             lambda tls: self._hold(conn, inbound, tls))
                    self._hold(conn, inbound, _raw(peer_side))
            orderly = _move(app_side, peer_side, self.bucket, c)
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection only
            if not conn.cut and not unauthenticated:
                with c.lock:
                    c.failed += 1
                    c.last_error = f"connection {index}: {type(exc).__name__}: {exc}"
                self.log(f"{self.name}: {c.last_error}")
        finally:
            self._give(held)
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
                engines.abort(*socks)


def _handshake(tls: ssl.SSLSocket, deadline: float) -> None:
    """``tls.do_handshake()``, done by ``deadline`` as a whole: a timeout per read would
    let a client that trickles its hello a byte at a time hold the handshake for ever."""
    tls.setblocking(False)
    poll = select.poll()
    try:
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS handshake timed out")
            poll.register(tls, events)
            poll.poll(remaining * 1000)
            poll.unregister(tls)
    finally:
        tls.settimeout(max(deadline - time.monotonic(), 0.001))


def _raw(peer: socket.socket | FramesPeer) -> socket.socket:
    return peer.raw if isinstance(peer, FramesPeer) else peer
