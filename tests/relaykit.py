"""What the native relay's tests share: a stream's two ends reserved and released through
the gateway calls, and a threaded TCP server standing in for the producer app."""

from __future__ import annotations

import hashlib
import socket
import threading

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

