"""A TCP forward: one local port to one remote address, for clients that insist on localhost.

The Compute SDK's ``local`` environment always calls the web service at localhost:5000;
in a namespace other than the cloud's, this forwards that port to the stand-in. One
thread per direction per connection: a control-plane forward, not a data path.

Run: ``PYTHONPATH=tests python -m world.forward --listen 127.0.0.1:5000 --to HOST:PORT``;
prints ``ready tcp://HOST:PORT`` once listening. :class:`Forward` runs it for a test,
with ``argv_prefix`` to run it inside a network namespace.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from pathlib import Path

__all__ = ["Forward"]


class Forward:
    """``python -m world.forward`` as a process; ``stop()`` ends it."""

    def __init__(self, listen: str, to: str, *, log_path: Path,
                 argv_prefix: list[str] | None = None):
        from world.auth_service import ReadyProcess

        self.process = ReadyProcess(
            [*(argv_prefix or []), sys.executable, "-m", "world.forward", "--listen", listen,
             "--to", to], log_path=log_path)
        self.url = self.process.url

    def stop(self) -> None:
        self.process.stop()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        source.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="world.forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--to", required=True, help="HOST:PORT to connect each one to")
    args = parser.parse_args(argv)
    target = _split(args.to)
    server = socket.create_server(_split(args.listen), reuse_port=False)
    host, port = server.getsockname()[:2]
    print(f"ready tcp://{host}:{port}", flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(target, timeout=30)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        # Each socket is closed by the thread that reads it; the other only shuts down.
        threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    raise SystemExit(main())
