"""What the native relay's tests share: a stream's two ends reserved and released through
the gateway calls, a threaded TCP server standing in for the producer app, an echo
round trip, a flood of unauthenticated clients and a relay's use of threads, memory and
descriptors (bench/flood.py uses the last three too)."""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from scistream_proxy import procfs
from scistream_proxy.addresses import parse_address

KEY = "relay-test-key"


def reserve_end(gw, role, uid, num_conn=1, rate=0):
    """Reserve ``role``'s end of stream ``uid`` on ``gw`` with the hello key ``KEY``."""
    return gw.call("reserve", {"uid": uid, "role": role, "num_conn": num_conn, "rate": rate,
                               "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()})


def release_both(producer, consumer, uid):
    producer.call("release", {"uid": uid})
    consumer.call("release", {"uid": uid})


class Server:
    """A threaded TCP server behind the producer gateway; ``handler(conn)`` per connection."""

    def __init__(self, handler):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.handler = handler
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            self.errors.append(exc)

    def close(self):
        self.sock.close()



def echo(conn):
    """A producer app that sends back what it reads."""
    buf = bytearray(1 << 16)
    while n := conn.recv_into(buf):
        conn.sendall(memoryview(buf)[:n])


def echo_roundtrip(address: str, payload: bytes) -> bytes:
    """Send ``payload`` to an echoing app at ``address``; what came back."""
    back = bytearray()
    with socket.create_connection(parse_address(address), timeout=60) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        while len(back) < len(payload):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            back += chunk
        sender.join()
    return bytes(back)


@dataclass(frozen=True)
class Usage:
    """What one process holds: threads, resident memory (KiB), open descriptors."""

    threads: int
    rss_kib: int
    fds: int


def usage(pid: int) -> Usage:
    """``pid``'s threads, RSS and descriptors, from /proc."""
    stat = procfs.stat(pid)
    assert stat is not None, f"process {pid} is gone"
    # Fields 20 and 24 of /proc/<pid>/stat (num_threads, rss in pages), counted from 1
    # with the pid and the command name before the list.
    return Usage(threads=int(stat[17]), rss_kib=int(stat[21]) * os.sysconf("SC_PAGESIZE") // 1024,
                 fds=len(os.listdir(f"/proc/{pid}/fd")))


def fd_limit(pid: int) -> int:
    """``pid``'s soft limit of open descriptors."""
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    return int(line.split()[3])


class Peak:
    """The most threads, RSS and descriptors ``pid`` held while the ``with`` block ran."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.pid, self.interval_s = pid, interval_s
        self.peak = usage(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            now = usage(self.pid)
            self.peak = Usage(*(max(a, b) for a, b in zip(
                (self.peak.threads, self.peak.rss_kib, self.peak.fds),
                (now.threads, now.rss_kib, now.fds), strict=True)))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def raise_fd_limit() -> int:
    """Raise this process's soft limit of descriptors to its hard limit (children
    started from now on inherit it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def client_hello() -> bytes:
    """A real TLS ClientHello, as a client's first flight."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), out)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


class Flood:
    """Unauthenticated clients against one TLS listener, held until :meth:`close`:
    ``idle`` connections that send nothing (opened without waiting: past the listener's
    backlog they stay in SYN_SENT, as a flood's do), ``stalled`` that send half a
    ClientHello and stop, ``trickling`` that send a ClientHello a byte every
    ``trickle_s`` (each read within any per-read timeout), and ``garbage`` that send
    bytes that are no TLS at all and close."""

    def __init__(self, address: str, *, idle: int, stalled: int = 0, trickling: int = 0,
                 garbage: int = 0, trickle_s: float = 0.5):
        self.address = parse_address(address)
        self.socks: list[socket.socket] = []
        self.trickles_cut = 0  # trickling clients the relay cut before their hello ended
        self._stop = threading.Event()
        hello = client_hello()
        # The idle ones last: past the backlog they would hold up the others' connects.
        for _ in range(garbage):
            with self._send(b"GET / HTTP/1.0\r\n\r\n" * 8):
                pass
        for _ in range(stalled):
            self.socks.append(self._send(hello[:len(hello) // 2]))
        started = threading.Event()
        self._trickler = threading.Thread(
            target=self._trickle, args=(hello, trickling, trickle_s, started), daemon=True)
        self._trickler.start()
        started.wait()
        for _ in range(idle):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(self.address)
            self.socks.append(sock)

    def _send(self, data: bytes) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=30)
        sock.sendall(data)
        return sock

    def _trickle(self, hello: bytes, count: int, every_s: float,
                 started: threading.Event) -> None:
        socks = []
        try:
            for _ in range(count):
                socks.append(socket.create_connection(self.address, timeout=30))
            started.set()
            for byte in range(len(hello)):
                if self._stop.wait(every_s):
                    return
                for sock in list(socks):
                    try:
                        sock.send(hello[byte:byte + 1])
                    except OSError:  # cut by the relay
                        socks.remove(sock)
                        sock.close()
                        self.trickles_cut += 1
        finally:
            started.set()
            for sock in socks:
                sock.close()

    def close(self) -> None:
        """The attackers leave."""
        self._stop.set()
        self._trickler.join()
        for sock in self.socks:
            sock.close()
        self.socks = []


def settle(read, *, timeout_s: float = 60.0, every_s: float = 0.5):
    """Poll ``read()`` until two reads in a row agree (or ``timeout_s`` passes); the
    last value."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(every_s)
        now = read()
        if now == last:
            return now
        last = now
    return last
