"""A stream's rate limit (a token bucket shared by its connections), the slots that bound
its connections and pending handshakes, and its counters."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

# The largest read a throttled connection makes, and the least burst its bucket allows.
CHUNK_MAX = 64 * 1024
# A stream of one listener still takes an app that opens a control connection beside
# its data connections (iperf3), or reconnects while old connections drain.
MIN_CONN_PER_STREAM = 16


def conn_cap(conn_per_listener: int, listeners: int) -> int:
    """The most connections a stream end holds at once, set-up included (the gateway
    setting ``conn_per_listener``; the native relay and HAProxy alike)."""
    return max(conn_per_listener * listeners, MIN_CONN_PER_STREAM)


class TokenBucket:
    """Stream-wide rate limit shared by all connections; ``rate_kbps`` 0 = unlimited."""

    def __init__(self, rate_kbps: int):
        self.rate = rate_kbps * 1000 / 8  # bytes per second
        self.capacity = max(self.rate / 10, CHUNK_MAX)  # 100 ms burst
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def chunk(self) -> int:
        """Largest read worth doing under the limit (smooths the rate)."""
        return int(min(CHUNK_MAX, max(1024, self.rate / 50)))

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            deficit = -self.tokens
        if deficit > 0:
            time.sleep(deficit / self.rate)


class Slots:
    """At most ``size`` holders at once (connections of a stream, handshakes pending in a
    stream or a relay). A waiter gives up when ``stop`` is set; it checks every
    ``_POLL_S``, so a stopped stream's accept threads end without a wake-up call."""

    _POLL_S = 0.2

    def __init__(self, size: int):
        self.size = size
        self._free = threading.Semaphore(size)

    def try_take(self) -> bool:
        """A slot if one is free now."""
        return self._free.acquire(blocking=False)

    def take(self, stop: threading.Event) -> bool:
        """Wait for a slot; False when ``stop`` was set first."""
        while not stop.is_set():
            if self._free.acquire(timeout=self._POLL_S):
                return True
        return False

    def give(self) -> None:
        self._free.release()


class Moved:
    """What one direction moved so far (plaintext bytes), read live by status."""

    __slots__ = ("moved",)

    def __init__(self) -> None:
        self.moved = 0


class Counters:
    """Per-stream totals, live: running connections count what they moved so far."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_to_app = 0  # of ended connections; live ones are in self.live
        self.bytes_from_app = 0
        self.live: set[tuple[Moved, Moved]] = set()  # (app -> peer, peer -> app)
        self.total = 0
        self.failed = 0
        self.spliced = 0  # connections moved with splice(2)
        self.frames = 0  # connections whose TLS hop carried sealed frames
        self.pumped = 0  # connections moved by a pump (an event loop), not threads
        self.ktls_tx = 0  # connections whose TLS records the kernel writes / reads
        self.ktls_rx = 0
        # Inbound connections that never authenticated: refused (a failed or broken
        # handshake) or out of time (``handshake_timeout_s``); and how often a cap made
        # the stream stop accepting for a while (the kernel's backlog held the rest).
        self.handshakes_refused = 0
        self.handshakes_timed_out = 0
        self.capped = 0
        self.last_error = ""

    def count(self, name: str) -> None:
        """One more connection went the way ``name`` counts."""
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    @contextmanager
    def tracked(self):
        """A connection's two directions (app -> peer, peer -> app) as :class:`Moved`,
        counted live while the block runs and folded into the totals when it ends."""
        pair = (Moved(), Moved())
        with self.lock:
            self.live.add(pair)
        try:
            yield pair
        finally:
            with self.lock:
                self.live.discard(pair)
                self.bytes_from_app += pair[0].moved
                self.bytes_to_app += pair[1].moved

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
                "connections_frames": self.frames,
                "connections_pumped": self.pumped,
                "connections_ktls": {"tx": self.ktls_tx, "rx": self.ktls_rx},
                "handshakes_refused": self.handshakes_refused,
                "handshakes_timed_out": self.handshakes_timed_out,
                "connections_capped": self.capped,
                "last_error": self.last_error,
            }
