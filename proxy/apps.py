"""Stand-in producer and consumer apps that check a stream end to end.

The producer listens, accepts ``--connections`` connections and sends each its share
of ``--bytes`` of generated data (different on every connection, so crossed wires
show); the consumer connects to every listener and reads to the end. Both print one
JSON line per connection (bytes, SHA-256), so the two sides can be compared::

    python -m scistream_proxy.apps producer --connections 4 --bytes 1073741824
    python -m scistream_proxy.apps consumer 127.0.0.1:51100 127.0.0.1:51101 ...

The producer first prints ``{"listening": ["host:port"]}``. From Python,
:func:`start_producer` and :func:`connection_results` do the parsing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

from scistream_proxy.addresses import format_address, parse_address

BLOCK = 1 << 20
COMMAND = [sys.executable, "-m", "scistream_proxy.apps"]


class EchoServer:
    """A stand-in producer app for fault tests and the soak: echoes every connection
    back (the client checks what returns), one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        buf = bytearray(1 << 16)
        try:
            with conn:
                while n := conn.recv_into(buf):
                    conn.sendall(memoryview(buf)[:n])
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def start_producer(connections: int, total_bytes: int, listen: str = "127.0.0.1:0"
                   ) -> tuple[subprocess.Popen, list[str]]:
    """Start the producer app (listening on ``listen``, port 0: any free); return it
    and the listeners it reported."""
    proc = subprocess.Popen(
        [*COMMAND, "producer", "--connections", str(connections), "--bytes", str(total_bytes),
         "--listen", listen],
        stdout=subprocess.PIPE, text=True,
    )
    return proc, json.loads(proc.stdout.readline())["listening"]


def connection_results(output: str) -> list[dict]:
    """The per-connection results an app printed last; [] if it printed none."""
    lines = output.strip().splitlines()
    return json.loads(lines[-1]).get("connections", []) if lines else []


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def produce(sock: socket.socket, nbytes: int) -> dict:
    """Send ``nbytes`` of connection-unique data; return its size and digest."""
    block = bytearray(os.urandom(BLOCK))
    digest = hashlib.sha256()
    sent, counter = 0, 0
    with sock:
        while sent < nbytes:
            block[:8] = counter.to_bytes(8, "little")  # no two blocks alike
            view = memoryview(block)[: min(BLOCK, nbytes - sent)]
            sock.sendall(view)
            digest.update(view)
            sent += len(view)
            counter += 1
    return {"bytes": sent, "sha256": digest.hexdigest()}


def consume(address: str, progress: list[int], slot: int, timeout_s: float) -> dict:
    """Read one connection to its end; return its size and digest."""
    digest = hashlib.sha256()
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    received = 0
    with socket.create_connection(parse_address(address), timeout=timeout_s) as sock:
        while n := sock.recv_into(buf):
            digest.update(view[:n])
            received += n
            progress[slot] = received
    return {"bytes": received, "sha256": digest.hexdigest()}


def _run_threads(targets: list, results: list) -> None:
    def run(index: int, fn, *args) -> None:
        try:
            results[index] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported per connection
            results[index] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=run, args=(i, *t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scistream_proxy.apps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="app", required=True)
    prod = sub.add_parser("producer", help="listen and send generated data")
    prod.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    prod.add_argument("--connections", type=int, default=1, help="connections to accept")
    prod.add_argument("--bytes", type=int, required=True, help="total bytes over all connections")
    cons = sub.add_parser("consumer", help="connect to listeners and read to the end")
    cons.add_argument("listeners", nargs="+",
                      help="host:port of each listener, one connection each")
    cons.add_argument("--progress", action="store_true", help="print bytes so far to stderr")
    cons.add_argument("--timeout", type=float, default=60.0, help="seconds a read may stall")
    args = parser.parse_args(argv)

    if args.app == "producer":
        host, port = parse_address(args.listen)
        server = socket.create_server((host, port), backlog=args.connections,
                                      family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        bound = server.getsockname()
        print(json.dumps({"listening": [format_address(*bound[:2])]}), flush=True)
        conns = [server.accept()[0] for _ in range(args.connections)]
        server.close()
        results: list = [None] * args.connections
        _run_threads([(produce, c, _share(args.bytes, args.connections, i))
                      for i, c in enumerate(conns)], results)
    else:
        progress = [0] * len(args.listeners)
        results = [None] * len(args.listeners)
        started = time.perf_counter()
        done = threading.Event()
        if args.progress:
            def report() -> None:
                while not done.wait(0.5):
                    print(json.dumps({"progress": sum(progress),
                                      "seconds": time.perf_counter() - started}),
                          file=sys.stderr, flush=True)
            threading.Thread(target=report, daemon=True).start()
        _run_threads([(consume, a, progress, i, args.timeout)
                      for i, a in enumerate(args.listeners)], results)
        done.set()
    print(json.dumps({"connections": results}), flush=True)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
