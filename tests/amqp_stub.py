"""A minimal AMQP 0-9-1 server on loopback: the result channel of Globus Compute, offline.

The Compute SDK's Executor receives task results over AMQP (pika) from the URL the web
service gives it. This stub speaks just enough of the protocol (pika's own frame
encoding) for one consumer: connection and channel handshakes, ``basic.consume``, and
``basic.deliver`` of the Result messages a test hands it. It is the fake that sits at
that seam; the Executor, its result watcher and pika are the real ones.
"""

from __future__ import annotations

import socket
import threading

from pika import frame, spec

__all__ = ["AmqpStub"]


class AmqpStub:
    """Accepts one AMQP client at a time; ``deliver(body)`` sends it a message."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.consuming = threading.Event()
        self.acked: list[int] = []
        self._conn: socket.socket | None = None
        self._consumer_tag = "scistream-test-consumer"
        self._channel = 1
        self._queue = ""
        self._delivery_tag = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _send(self, *frames) -> None:
        with self._lock:
            self._conn.sendall(b"".join(f.marshal() for f in frames))

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._conn = conn
            try:
                self._session(conn)
            except OSError:
                pass
            finally:
                conn.close()
                self.consuming.clear()

    def _session(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
            while buffer:
                consumed, received = frame.decode_frame(buffer)
                if not consumed:
                    break
                buffer = buffer[consumed:]
                if self._handle(received) is False:
                    return

    def _handle(self, received) -> bool | None:
        if isinstance(received, frame.ProtocolHeader):
            self._send(frame.Method(0, spec.Connection.Start(
                server_properties={"product": "scistream-amqp-stub"},
                mechanisms="PLAIN", locales="en_US")))
            return None
        if not isinstance(received, frame.Method):
            return None  # heartbeats, content we never expect from a consumer
        method = received.method
        if isinstance(method, spec.Connection.StartOk):
            self._send(frame.Method(0, spec.Connection.Tune(channel_max=16,
                                                            frame_max=131072, heartbeat=0)))
        elif isinstance(method, spec.Connection.Open):
            self._send(frame.Method(0, spec.Connection.OpenOk()))
        elif isinstance(method, spec.Channel.Open):
            self._channel = received.channel_number
            self._send(frame.Method(self._channel, spec.Channel.OpenOk()))
        elif isinstance(method, spec.Basic.Qos):
            self._send(frame.Method(received.channel_number, spec.Basic.QosOk()))
        elif isinstance(method, spec.Basic.Consume):
            self._queue = method.queue
            self._consumer_tag = method.consumer_tag or self._consumer_tag
            self._send(frame.Method(received.channel_number,
                                    spec.Basic.ConsumeOk(consumer_tag=self._consumer_tag)))
            self.consuming.set()
        elif isinstance(method, spec.Basic.Ack):
            self.acked.append(method.delivery_tag)
        elif isinstance(method, spec.Basic.Cancel):
            self._send(frame.Method(received.channel_number,
                                    spec.Basic.CancelOk(consumer_tag=method.consumer_tag)))
        elif isinstance(method, spec.Channel.Close):
            self.consuming.clear()
            self._send(frame.Method(received.channel_number, spec.Channel.CloseOk()))
        elif isinstance(method, spec.Connection.Close):
            self._send(frame.Method(0, spec.Connection.CloseOk()))
            return False
        return None

    def deliver(self, body: bytes, timeout: float = 60.0) -> None:
        """Send one message to the consumer (waits until one is consuming)."""
        if not self.consuming.wait(timeout):
            raise AssertionError("no AMQP consumer connected to the stub")
        self._delivery_tag += 1
        self._send(
            frame.Method(self._channel, spec.Basic.Deliver(
                consumer_tag=self._consumer_tag, delivery_tag=self._delivery_tag,
                exchange="", routing_key=self._queue)),
            frame.Header(self._channel, len(body), spec.BasicProperties(
                content_type="application/octet-stream", delivery_mode=2)),
            frame.Body(self._channel, body),
        )

    def close(self) -> None:
        self._closed = True
        self.server.close()
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=10)


def run_like_an_endpoint(settings_path: str, function_code: str, task_payload: str,
                         task_id: str, run_dir: str) -> bytes:
    """What an endpoint's worker does with a task: globus-compute-endpoint's own
    ``execute_task`` on the function the service registered and the arguments the SDK
    submitted, with the gateway's settings. Returns the packed Result message.

    Run it in its own process: ``execute_task`` changes the working directory.
    """
    import os
    import uuid

    from globus_compute_common.messagepack import pack
    from globus_compute_common.messagepack.message_types import Task
    from globus_compute_endpoint.engines.helper import execute_task

    os.environ["SCISTREAM_GATEWAY_CONFIG"] = settings_path
    task = Task(task_id=uuid.UUID(task_id), task_buffer=function_code + task_payload)
    return execute_task(pack(task), uuid.UUID(task_id), run_dir=run_dir)
