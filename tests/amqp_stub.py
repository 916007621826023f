"""A minimal AMQP 0-9-1 server on loopback: the result channel of Globus Compute, offline.

The Compute SDK's Executor receives task results over AMQP (pika) from the URL the web
service gives it. This stub speaks just enough of the protocol (pika's own frame
encoding) for its consumers: connection and channel handshakes, ``basic.consume``, and
``basic.deliver`` of the Result messages a test hands it. It is the fake that sits at
that seam; the Executor, its result watcher and pika are the real ones.
"""

from __future__ import annotations

import socket
import threading

from pika import frame, spec

__all__ = ["AmqpStub"]


class _Client:
    """One AMQP connection: its socket, channel and consumer."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.channel = 1
        self.consumer_tag = ""
        self.queue = ""
        self.delivery_tag = 0
        self.lock = threading.Lock()

    def send(self, *frames) -> None:
        with self.lock:
            self.conn.sendall(b"".join(f.marshal() for f in frames))


class AmqpStub:
    """Serves AMQP clients on loopback; ``deliver(body)`` sends a message to every consumer.

    Every consumer gets every message: a result watcher stores results it has no future
    for, so only the one waiting for that task completes anything.
    """

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.acked: list[int] = []
        self._consumers: list[_Client] = []
        self._clients: list[_Client] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            client = _Client(conn)
            self._clients.append(client)
            threading.Thread(target=self._session, args=(client,), daemon=True).start()

    def _session(self, client: _Client) -> None:
        buffer = b""
        try:
            while True:
                data = client.conn.recv(65536)
                if not data:
                    return
                buffer += data
                while buffer:
                    consumed, received = frame.decode_frame(buffer)
                    if not consumed:
                        break
                    buffer = buffer[consumed:]
                    if self._handle(client, received) is False:
                        return
        except OSError:
            return
        finally:
            with self._changed:
                if client in self._consumers:
                    self._consumers.remove(client)
            client.conn.close()

    def _handle(self, client: _Client, received) -> bool | None:
        if isinstance(received, frame.ProtocolHeader):
            client.send(frame.Method(0, spec.Connection.Start(
                server_properties={"product": "scistream-amqp-stub"},
                mechanisms="PLAIN", locales="en_US")))
            return None
        if not isinstance(received, frame.Method):
            return None  # heartbeats, content we never expect from a consumer
        method, number = received.method, received.channel_number
        if isinstance(method, spec.Connection.StartOk):
            client.send(frame.Method(0, spec.Connection.Tune(channel_max=16,
                                                             frame_max=131072, heartbeat=0)))
        elif isinstance(method, spec.Connection.Open):
            client.send(frame.Method(0, spec.Connection.OpenOk()))
        elif isinstance(method, spec.Channel.Open):
            client.channel = number
            client.send(frame.Method(number, spec.Channel.OpenOk()))
        elif isinstance(method, spec.Basic.Qos):
            client.send(frame.Method(number, spec.Basic.QosOk()))
        elif isinstance(method, spec.Basic.Consume):
            client.queue = method.queue
            client.consumer_tag = method.consumer_tag or f"stub-consumer-{id(client)}"
            client.send(frame.Method(number,
                                     spec.Basic.ConsumeOk(consumer_tag=client.consumer_tag)))
            with self._changed:
                self._consumers.append(client)
                self._changed.notify_all()
        elif isinstance(method, spec.Basic.Ack):
            self.acked.append(method.delivery_tag)
        elif isinstance(method, spec.Basic.Cancel):
            client.send(frame.Method(number,
                                     spec.Basic.CancelOk(consumer_tag=method.consumer_tag)))
        elif isinstance(method, spec.Channel.Close):
            with self._changed:
                if client in self._consumers:
                    self._consumers.remove(client)
            client.send(frame.Method(number, spec.Channel.CloseOk()))
        elif isinstance(method, spec.Connection.Close):
            client.send(frame.Method(0, spec.Connection.CloseOk()))
            return False
        return None

    def deliver(self, body: bytes, timeout: float = 60.0) -> None:
        """Send one message to every consumer (waits until there is one)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._consumers, timeout):
                raise AssertionError("no AMQP consumer connected to the stub")
            consumers = list(self._consumers)
        for client in consumers:
            client.delivery_tag += 1
            try:
                client.send(
                    frame.Method(client.channel, spec.Basic.Deliver(
                        consumer_tag=client.consumer_tag, delivery_tag=client.delivery_tag,
                        exchange="", routing_key=client.queue)),
                    frame.Header(client.channel, len(body), spec.BasicProperties(
                        content_type="application/octet-stream", delivery_mode=2)),
                    frame.Body(client.channel, body),
                )
            except OSError:
                pass  # that consumer went away; the others still get it

    def close(self) -> None:
        self._closed = True
        try:  # wakes the accept() in the serving thread; close() alone would not
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for client in self._clients:
            try:
                client.conn.shutdown(socket.SHUT_RDWR)
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

    from scistream_gateway.local_worker import ALLOWED_SERIALIZERS

    os.environ["SCISTREAM_GATEWAY_CONFIG"] = settings_path
    task = Task(task_id=uuid.UUID(task_id), task_buffer=function_code + task_payload)
    # As the shipped endpoint configs have it: source code and JSON data only.
    return execute_task(pack(task), uuid.UUID(task_id), run_dir=run_dir,
                        task_deserializers=list(ALLOWED_SERIALIZERS))


class OfflineCompute:
    """Globus Compute's web service and result queue for one endpoint, on this machine.

    HTTP: ``responses`` callbacks at the URLs the SDK calls (function registration,
    batch submit, the AMQP URL). Each submitted task runs in a separate process through
    :func:`run_like_an_endpoint` against a local gateway's settings, and its Result is
    delivered over :class:`AmqpStub`. Activate ``responses`` before creating it.
    """

    BASE = "https://compute.api.globus.org"

    def __init__(self, endpoint_id: str, settings_path: str, run_dir: str):
        import json
        import multiprocessing
        import uuid
        from concurrent.futures import ProcessPoolExecutor

        import responses

        self.endpoint_id, self.settings_path, self.run_dir = endpoint_id, settings_path, run_dir
        self.broker = AmqpStub()
        self.functions: dict[str, str] = {}
        self.task_group_id = str(uuid.uuid4())
        self.tasks_run = 0
        self.pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        self._json, self._uuid = json, uuid
        responses.add_callback(responses.POST, f"{self.BASE}/v3/functions",
                               callback=self._register)
        responses.add_callback(responses.POST, f"{self.BASE}/v3/endpoints/{endpoint_id}/submit",
                               callback=self._submit)
        responses.add(responses.GET, f"{self.BASE}/v2/get_amqp_result_connection_url",
                      json={"queue_prefix": "scistream-test-", "connection_url": self.broker.url})

    def _register(self, request):
        function_id = str(self._uuid.uuid4())
        self.functions[function_id] = self._json.loads(request.body)["function_code"]
        return 200, {}, self._json.dumps({"function_uuid": function_id})

    def _submit(self, request):
        body = self._json.loads(request.body)
        accepted: dict[str, list[str]] = {}
        for function_id, payloads in body["tasks"].items():
            for payload in payloads:
                task_id = str(self._uuid.uuid4())
                accepted.setdefault(function_id, []).append(task_id)
                run = self.pool.submit(run_like_an_endpoint, self.settings_path,
                                       self.functions[function_id], payload, task_id,
                                       self.run_dir)
                run.add_done_callback(self._deliver)
        return 200, {}, self._json.dumps({
            "request_id": str(self._uuid.uuid4()), "task_group_id": self.task_group_id,
            "endpoint_id": self.endpoint_id, "tasks": accepted})

    def _deliver(self, run) -> None:
        self.tasks_run += 1
        self.broker.deliver(run.result())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.broker.close()
