"""A stand-in for the Globus Compute web service: the HTTP API the SDK and the endpoint
call, over a real RabbitMQ, with identities from the Auth stand-in.

What it serves (the paths of globus-sdk's ComputeClientV2/V3):

- endpoint registration (``POST /v3/endpoints``, ``PUT /v3/endpoints/{id}``): creates
  the endpoint's broker user (rabbitmqctl; it may touch only ``ep.<id>.*`` queues and
  publish results and heartbeats) and its command queue, and hands out the queue
  information; endpoint metadata and status (from the endpoints' heartbeats);
- function registration (``POST /v3/functions``); the source is kept, as the service
  does, and sent with each task;
- batch submit (``POST /v3/endpoints/{id}/submit``): refuses a function not in the
  endpoint's ``allowed_functions`` and another identity's single-user endpoint (403),
  picks the user endpoint for (identity, user config), sends the manager endpoint the
  start-user-endpoint command (every batch: an endpoint already running it only takes
  the fresh credentials), and publishes each task to that user endpoint's task queue;
- the result path: consumes the endpoints' results and forwards each to the result
  queue of its task group (``tg.<identity>.<task group>``), where the Executor's result
  watcher reads it with a broker user of that identity (``GET
  /v2/get_amqp_result_connection_url``); task status (``GET /v2/tasks/{id}``,
  ``POST /v2/batch_status``).

Every request's bearer token is introspected at the Auth stand-in (401 when it is not
active); its ``sub`` is the caller. The control file (JSON, read at start and again on
SIGHUP) holds ``delay_ms``, how long every request is held first (the distance to the
cloud), and ``refuse_status``, whether endpoint-status requests fail (503), as a
service's may. The service's own work is event-driven (no polling loop on a task's
way); each result's log line splits the task's time into its hops, from the
endpoint's own timestamps: publish to the worker's start, in the worker, and back.

Run: ``PYTHONPATH=tests python -m world.compute_service --listen HOST:PORT --broker-state
FILE --auth-url URL --control FILE [--amqp-address HOST:PORT]``, with the service's own
Auth client in ``WORLD_COMPUTE_CLIENT_ID`` / ``WORLD_COMPUTE_CLIENT_SECRET`` (secrets stay
out of argv; the broker's admin password is in its owner-only state file). Prints
``ready http://HOST:PORT``, and ``configured {...}`` after each SIGHUP.
:class:`ComputeService` runs it for a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import secrets
import select
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["ComputeService"]

log = logging.getLogger("world.compute_service")

RESULTS, HEARTBEATS = "results", "heartbeats"


class ComputeService:
    """The web-service stand-in as a process (``argv_prefix`` runs it in a namespace).

    ``auth`` is an :class:`~world.auth_service.AuthService` with a client named
    ``compute`` (the service's own, for introspection). Its environment is the world's
    (:func:`world.netns.world_env`: no socket guard of the suite's) with its own HOME."""

    def __init__(self, broker, auth, *, host: str = "127.0.0.1", port: int = 5000,
                 delay_ms: int = 0, amqp_address: str | None = None,
                 argv_prefix: list[str] | None = None, workdir: Path):
        from world.auth_service import ReadyProcess

        client_id, secret = auth.clients["compute"]
        self.control = Path(workdir) / "compute-control.json"
        self._write_control({"delay_ms": delay_ms, "refuse_status": False})
        argv = [*(argv_prefix or []), sys.executable, "-m", "world.compute_service",
                "--listen", f"{host}:{port}", "--broker-state", str(broker.save_state()),
                "--auth-url", auth.url, "--control", str(self.control)]
        if amqp_address:
            argv += ["--amqp-address", amqp_address]
        self.process = ReadyProcess(
            argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                       "LANG": "C.UTF-8", "HOME": str(workdir),
                       "WORLD_COMPUTE_CLIENT_ID": client_id,
                       "WORLD_COMPUTE_CLIENT_SECRET": secret},
            log_path=Path(workdir) / "compute-service.log")
        self.url = self.process.url

    def _write_control(self, control: dict) -> None:
        fd = os.open(self.control, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(control, f)

    def configure(self, *, delay_ms: int = 0, refuse_status: bool = False,
                  timeout_s: float = 10.0) -> None:
        """Change the running service's settings; returns once it applies them."""
        control = {"delay_ms": delay_ms, "refuse_status": refuse_status}
        self._write_control(control)
        self.process.proc.send_signal(signal.SIGHUP)
        stdout = self.process.proc.stdout
        if not select.select([stdout], [], [], timeout_s)[0]:
            raise RuntimeError(f"the Compute stand-in did not apply {control}")
        line = stdout.readline().decode()
        if json.loads(line.partition(" ")[2] or "null") != control:
            raise RuntimeError(f"the Compute stand-in answered {line!r} to {control}")

    def stop(self) -> None:
        self.process.stop()


@dataclass
class Endpoint:
    endpoint_id: str
    owner: str
    name: str
    multi_user: bool
    allowed_functions: list[str]
    broker_user: str
    broker_password: str
    parent: str | None = None  # a user endpoint's manager endpoint
    heartbeat: dict = field(default_factory=dict)
    heartbeat_at: float = 0.0


class State:
    """Endpoints, functions, tasks and the broker: the service's memory."""

    def __init__(self, broker, auth_url: str, client: tuple[str, str], amqp_address: str):
        import pika

        self.broker = broker
        self.auth_url = auth_url.rstrip("/")
        self.client = client
        self.amqp_address = amqp_address
        self.lock = threading.Lock()
        self.endpoints: dict[str, Endpoint] = {}
        self.functions: dict[str, dict] = {}
        self.tasks: dict[str, dict] = {}
        self.result_users: dict[str, tuple[str, str]] = {}
        self.delay_s = 0.0
        self.refuse_status = False
        self._publisher = pika.BlockingConnection(pika.URLParameters(broker.url()))
        self._publish_lock = threading.Lock()
        channel = self._publisher.channel()
        for name in (RESULTS, HEARTBEATS):
            channel.exchange_declare(name, exchange_type="direct", durable=True)
            channel.queue_declare(name, durable=True)
            channel.queue_bind(name, name, routing_key=name)
        self._channel = channel
        threading.Thread(target=self._keep_publisher_alive, daemon=True).start()

    # -- identities
    def introspect(self, token: str) -> dict | None:
        """The Auth stand-in's word on ``token``: its record if active, else None."""
        basic = base64.b64encode(":".join(self.client).encode()).decode()
        request = urllib.request.Request(
            f"{self.auth_url}/v2/oauth2/token/introspect",
            data=urllib.parse.urlencode({"token": token}).encode(),
            headers={"Authorization": f"Basic {basic}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            info = json.load(reply)
        return info if info.get("active") else None

    # -- broker
    def amqp_url(self, user: str, password: str) -> str:
        q = urllib.parse.quote
        return (f"amqp://{q(user, safe='')}:{q(password, safe='')}@{self.amqp_address}/"
                f"{q(self.broker.vhost, safe='')}")

    def _keep_publisher_alive(self) -> None:
        while True:  # pika's blocking connection answers heartbeats only when called
            time.sleep(5)
            with self._publish_lock:
                self._publisher.process_data_events(0)

    def publish(self, queue: str, body: bytes, **properties) -> None:
        import pika

        with self._publish_lock:
            self._channel.basic_publish("", queue, body,
                                        pika.BasicProperties(delivery_mode=2, **properties))

    def declare(self, queue: str) -> None:
        with self._publish_lock:
            self._channel.queue_declare(queue, durable=True)

    def queue_info(self, endpoint: Endpoint) -> dict:
        url = self.amqp_url(endpoint.broker_user, endpoint.broker_password)
        root = endpoint.parent or endpoint.endpoint_id

        def publish_info(name):
            return {"connection_url": url, "exchange": name, "queue": name,
                    "queue_publish_kwargs": {"exchange": name, "routing_key": name,
                                             "mandatory": True,
                                             "properties": {"delivery_mode": 2}}}

        info = {"endpoint_id": endpoint.endpoint_id,
                "task_queue_info": {"connection_url": url,
                                    "queue": f"ep.{root}.{endpoint.endpoint_id}.tasks"},
                "result_queue_info": publish_info(RESULTS),
                "heartbeat_queue_info": publish_info(HEARTBEATS)}
        if endpoint.parent is None:
            info["command_queue_info"] = {"connection_url": url,
                                          "queue": f"ep.{root}.commands"}
        return info

    def register_endpoint(self, endpoint_id: str, caller: dict, data: dict) -> dict:
        with self.lock:
            known = self.endpoints.get(endpoint_id)
        if known is not None and known.owner != caller["sub"]:
            raise HttpError(403, "FORBIDDEN", "this endpoint belongs to another identity")
        if known is None:
            user, password = f"ep-{endpoint_id}", secrets.token_urlsafe(18)
            own = f"^ep\\.{re.escape(endpoint_id)}\\..*$"
            self.broker.add_user(user, password, configure=own,
                                 write=f"^({RESULTS}|{HEARTBEATS})$|{own}",
                                 read=f"^({RESULTS}|{HEARTBEATS})$|{own}")
            known = Endpoint(endpoint_id, caller["sub"], data.get("endpoint_name", ""),
                             bool(data.get("multi_user")), [], user, password)
        known.allowed_functions = [str(f) for f in data.get("allowed_functions") or []]
        known.multi_user = bool(data.get("multi_user"))
        with self.lock:
            self.endpoints[endpoint_id] = known
        info = self.queue_info(known)
        self.declare(info["command_queue_info"]["queue"])
        self.declare(info["task_queue_info"]["queue"])
        return info

    def user_endpoint(self, manager: Endpoint, caller: dict, user_config: dict) -> Endpoint:
        """The user endpoint for this identity and user config, made on first use."""
        key = json.dumps([caller["sub"], user_config], sort_keys=True)
        uep_id = str(uuid.uuid5(uuid.UUID(manager.endpoint_id), key))
        with self.lock:
            uep = self.endpoints.get(uep_id)
            if uep is None:
                uep = self.endpoints[uep_id] = Endpoint(
                    uep_id, caller["sub"], f"uep.{manager.endpoint_id}.{uep_id}",
                    False, manager.allowed_functions, manager.broker_user,
                    manager.broker_password, parent=manager.endpoint_id)
        self.declare(self.queue_info(uep)["task_queue_info"]["queue"])
        return uep

    def result_queue_user(self, caller: dict) -> tuple[str, str]:
        """This identity's broker user, which may read only its task groups' queues."""
        with self.lock:
            known = self.result_users.get(caller["sub"])
        if known is None:
            user, password = f"results-{caller['sub']}", secrets.token_urlsafe(18)
            own = f"^tg\\.{re.escape(caller['sub'])}\\..*$"
            self.broker.add_user(user, password, configure="^$", write="^$", read=own)
            known = (user, password)
            with self.lock:
                self.result_users[caller["sub"]] = known
        return known

    # -- the consuming side
    def consume(self) -> None:
        """Results and heartbeats, forever (its own connection: pika is per-thread)."""
        import pika
        from globus_compute_common import messagepack

        connection = pika.BlockingConnection(pika.URLParameters(self.broker.url()))
        channel = connection.channel()

        def on_result(ch, method, properties, body):
            try:
                result = messagepack.unpack(body)
                task_id = str(result.task_id)
                with self.lock:
                    task = self.tasks.get(task_id)
                    if task is not None:
                        task["result"] = result
                if task is not None:
                    ch.basic_publish("", task["result_queue"], body,
                                     pika.BasicProperties(delivery_mode=2))
                    log.info("task %s: result %s", task_id, _hops(task, result))
            except Exception:  # noqa: BLE001 - one bad message must not stop the service
                log.exception("a result could not be forwarded")
            ch.basic_ack(method.delivery_tag)

        def on_heartbeat(ch, method, properties, body):
            try:
                report = messagepack.unpack(body)
                with self.lock:
                    endpoint = self.endpoints.get(str(report.endpoint_id))
                    if endpoint is not None:
                        endpoint.heartbeat = dict(report.global_state)
                        endpoint.heartbeat_at = time.time()
            except Exception:  # noqa: BLE001
                log.exception("a heartbeat could not be read")
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(RESULTS, on_result)
        channel.basic_consume(HEARTBEATS, on_heartbeat)
        channel.start_consuming()

    # -- submit
    def submit(self, endpoint_id: str, caller: dict, batch: dict) -> dict:
        from globus_compute_common.messagepack import pack
        from globus_compute_common.messagepack.message_types import Task

        with self.lock:
            manager = self.endpoints.get(endpoint_id)
        if manager is None or manager.parent is not None:
            raise HttpError(404, "ENDPOINT_NOT_FOUND", f"no endpoint {endpoint_id}")
        if not manager.multi_user and manager.owner != caller["sub"]:
            raise HttpError(403, "FORBIDDEN",
                            f"endpoint {endpoint_id} runs tasks of its owner only")
        for function_id in batch.get("tasks", {}):
            if function_id not in self.functions:
                raise HttpError(404, "FUNCTION_NOT_FOUND", f"no function {function_id}")
            if manager.allowed_functions and function_id not in manager.allowed_functions:
                raise HttpError(403, "FUNCTION_NOT_PERMITTED",
                                f"Function {function_id} not permitted on endpoint "
                                f"{endpoint_id}")
        task_group_id = str(batch.get("task_group_id") or uuid.uuid4())
        result_queue = f"tg.{caller['sub']}.{task_group_id}"
        self.declare(result_queue)
        user_config = batch.get("user_endpoint_config") or {}
        uep = self.user_endpoint(manager, caller, user_config)
        info = self.queue_info(uep)
        self.publish(
            self.queue_info(manager)["command_queue_info"]["queue"],
            json.dumps({
                "command": "cmd_start_endpoint",
                "globus_effective_identity": caller["sub"],
                # The fields of an Auth identity (identity mapping reads "id", and
                # maps only identities whose status is "used" or "private").
                "globus_identity_set": [{"id": caller["sub"], "sub": caller["sub"],
                                         "status": "used",
                                         "username": caller.get("username"),
                                         "name": caller.get("name"),
                                         "email": caller.get("email")}],
                "globus_username": caller.get("username"),
                "args": [],
                "kwargs": {"name": uep.name, "user_opts": user_config,
                           "user_runtime": batch.get("user_runtime") or {},
                           "amqp_creds": info},
            }).encode(),
            content_type="application/json", timestamp=int(time.time()))
        accepted: dict[str, list[str]] = {}
        for function_id, payloads in batch.get("tasks", {}).items():
            code = self.functions[function_id]["function_code"]
            for payload in payloads:
                task_id = str(uuid.uuid4())
                with self.lock:
                    self.tasks[task_id] = {"result_queue": result_queue, "result": None,
                                           "owner": caller["sub"],
                                           "published": time.time()}
                self.publish(
                    info["task_queue_info"]["queue"],
                    pack(Task(task_id=uuid.UUID(task_id), task_buffer=code + payload)),
                    content_type="application/octet-stream",
                    headers={"function_uuid": function_id, "task_uuid": task_id,
                             "resource_specification": json.dumps(
                                 batch.get("resource_specification") or {}),
                             "result_serializers": batch.get("result_serializers") or []})
                accepted.setdefault(function_id, []).append(task_id)
                log.info("task %s: published to %s, results to %s", task_id,
                         info["task_queue_info"]["queue"], result_queue)
        return {"request_id": str(uuid.uuid4()), "task_group_id": task_group_id,
                "endpoint_id": endpoint_id, "tasks": accepted}

    def task_status(self, task_id: str, caller: dict) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
        if task is None or task["owner"] != caller["sub"]:
            raise HttpError(404, "TASK_NOT_FOUND", f"no task {task_id}")
        result = task["result"]
        if result is None:
            return {"task_id": task_id, "status": "waiting-for-ep"}
        if result.is_error:
            return {"task_id": task_id, "status": "failed", "exception": result.data}
        return {"task_id": task_id, "status": "success", "result": result.data,
                "completion_t": str(time.time())}

    def endpoint_status(self, endpoint_id: str) -> dict:
        with self.lock:
            endpoint = self.endpoints.get(endpoint_id)
            if endpoint is None:
                raise HttpError(404, "ENDPOINT_NOT_FOUND", f"no endpoint {endpoint_id}")
            period = float(endpoint.heartbeat.get("heartbeat_period", 30))
            # A period of 0 is an endpoint's last heartbeat: it is shutting down.
            online = (period > 0 and endpoint.heartbeat_at > time.time() - 3 * period
                      and endpoint.heartbeat.get("active", True) is not False)
            return {"status": "online" if online else "offline",
                    "details": dict(endpoint.heartbeat)}


def _hops(task: dict, result) -> str:
    """A task's time from its publish to its result here, split at the worker's own
    timestamps (EXEC_START, EXEC_END) where the result carries them."""
    now = time.time()
    total = f"{now - task['published']:.3f} s after its publish"
    stamps = {getattr(s.state, "value", s.state): s.timestamp / 1e9
              for s in (result.task_statuses or [])}
    start, end = stamps.get("execution-start"), stamps.get("execution-end")
    if start is None or end is None:
        return total
    return (f"{total}: {start - task['published']:.3f} s to the worker, "
            f"{end - start:.3f} s in it, {now - end:.3f} s back")


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def make_handler(state: State):
    version = {"api": "1.0.0", "min_ep_version": "2.0.0", "min_sdk_version": "2.0.0"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # the log, not stderr noise per request
            log.debug("%s " + fmt, self.address_string(), *args)

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _caller(self) -> dict:
            header = self.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            info = state.introspect(token) if scheme.lower() == "bearer" and token else None
            if info is None or "funcx_service" not in info.get("aud", []):
                raise HttpError(401, "UNAUTHORIZED", "no valid Globus Compute token")
            return info

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def _handle(self, method: str) -> None:
            time.sleep(state.delay_s)
            path = urllib.parse.urlsplit(self.path).path.rstrip("/")
            try:
                if state.refuse_status and re.fullmatch(r"/v2/endpoints/[^/]+/status", path):
                    raise HttpError(503, "SERVICE_UNAVAILABLE", "endpoint status is "
                                    "unavailable (the stand-in's refuse_status)")
                body = self._body() if method in ("POST", "PUT") else {}
                if path == "/v2/version":
                    return self._reply(200, version)
                caller = self._caller()
                self._reply(200, route(method, path, caller, body))
            except HttpError as exc:
                self._reply(exc.status, {"code": exc.code, "error": exc.code,
                                         "reason": exc.message})
            except Exception as exc:  # noqa: BLE001 - a 500 with the reason, as a service
                log.exception("request failed")
                self._reply(500, {"code": "INTERNAL_ERROR", "error": "INTERNAL_ERROR",
                                  "reason": f"{type(exc).__name__}: {exc}"})

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

    def route(method: str, path: str, caller: dict, body: dict) -> dict:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/v3/endpoints":
            return state.register_endpoint(str(uuid.uuid4()), caller, body)
        if method == "PUT" and parts[:2] == ["v3", "endpoints"] and len(parts) == 3:
            return state.register_endpoint(parts[2], caller, body)
        if method == "POST" and parts[:2] == ["v3", "endpoints"] and parts[3:] == ["submit"]:
            return state.submit(parts[2], caller, body)
        if method == "GET" and parts[:2] == ["v2", "endpoints"] and parts[3:] == ["status"]:
            return state.endpoint_status(parts[2])
        if method == "GET" and parts[:2] == ["v2", "endpoints"] and len(parts) == 3:
            with state.lock:
                endpoint = state.endpoints.get(parts[2])
            if endpoint is None:
                raise HttpError(404, "ENDPOINT_NOT_FOUND", f"no endpoint {parts[2]}")
            return {"uuid": endpoint.endpoint_id, "name": endpoint.name,
                    "multi_user": endpoint.multi_user, "owner": endpoint.owner}
        if method == "POST" and path == "/v3/functions":
            function_id = str(uuid.uuid4())
            state.functions[function_id] = {**body, "owner": caller["sub"]}
            return {"function_uuid": function_id}
        if method == "GET" and parts[:2] == ["v2", "tasks"] and len(parts) == 3:
            return state.task_status(parts[2], caller)
        if method == "POST" and path == "/v2/batch_status":
            results = {}
            for task_id in body.get("task_ids", []):
                try:
                    results[task_id] = state.task_status(task_id, caller)
                except HttpError:
                    results[task_id] = {"task_id": task_id, "status": "unknown"}
            return {"response": "batch", "results": results}
        if method == "GET" and path == "/v2/get_amqp_result_connection_url":
            user, password = state.result_queue_user(caller)
            return {"queue_prefix": f"tg.{caller['sub']}.",
                    "connection_url": state.amqp_url(user, password)}
        raise HttpError(404, "NOT_FOUND", f"{method} {path} is not served by this stand-in")

    return Handler


def main(argv: list[str] | None = None) -> int:
    from world.broker import Broker

    parser = argparse.ArgumentParser(prog="world.compute_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve HTTP on")
    parser.add_argument("--broker-state", required=True, type=Path,
                        help="the broker's state file (world.broker.Broker.save_state)")
    parser.add_argument("--auth-url", required=True, help="the Auth stand-in's base URL")
    parser.add_argument("--amqp-address",
                        help="HOST:PORT at which endpoints and clients reach the broker "
                             "(default: the broker's own)")
    parser.add_argument("--control", required=True, type=Path,
                        help="JSON settings, read at start and on SIGHUP: delay_ms (hold "
                             "every request this long first), refuse_status (503 to "
                             "endpoint-status requests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    broker = Broker.attach(args.broker_state)
    netloc = f"[{broker.host}]" if ":" in broker.host else broker.host
    state = State(broker, args.auth_url,
                  (os.environ["WORLD_COMPUTE_CLIENT_ID"],
                   os.environ["WORLD_COMPUTE_CLIENT_SECRET"]),
                  args.amqp_address or f"{netloc}:{broker.amqp_port}")

    def apply_control(*_) -> None:
        control = json.loads(args.control.read_text())
        state.delay_s = int(control.get("delay_ms", 0)) / 1000
        state.refuse_status = bool(control.get("refuse_status", False))
        log.info("settings: %s", control)
        if _:  # a SIGHUP: say so to the parent waiting for it
            print(f"configured {json.dumps(control)}", flush=True)

    apply_control()
    signal.signal(signal.SIGHUP, apply_control)
    threading.Thread(target=state.consume, daemon=True).start()
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)),
                                 make_handler(state))
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    print(f"ready http://{host or bound_host}:{bound_port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    raise SystemExit(main())
