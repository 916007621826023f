"""The federation: the world's network with everything in it (the cloud's stand-ins, a
real RabbitMQ, a real endpoint daemon on each gateway node, a Prefect server and worker),
and a stream end to end through it, as the tests, ``make federation`` and a bench run it.

Who is who: one confidential client, ``pipeline``, is the pipeline author's identity. It
owns gateway P's single-user endpoint (a single-user endpoint runs only its owner's
tasks) and gateway C's, and it is the identity of the flows' ``GlobusCredentials``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from world.auth_service import AuthService
from world.broker import Broker
from world.compute_service import ComputeService
from world.endpoints import EndpointDaemon, globus_env, register_functions
from world.netns import APP_P, C_LAN, C_WAN, CLOUD, P_LAN, P_PUBLIC, P_WAN, World
from world.prefect_world import PrefectWorld

__all__ = ["Federation", "GatewayNode", "call", "stream_end_to_end"]

COMPUTE_PORT = 5000  # the Compute SDK's `local` environment: http://localhost:5000
PORTS = (40000, 40099)  # each gateway's port range
CREDENTIALS_BLOCK = "world-pipeline"


class GatewayNode:
    """A gateway node: its Unix user, home, gateway settings and endpoint daemon."""

    def __init__(self, fed: Federation, ns: str, name: str, settings: dict):
        self.fed, self.ns, self.name = fed, ns, name
        self.user = f"ssw{fed.world.token}{ns[-1]}"
        self.home = fed.root / ns
        self.state_dir = self.home / "state"
        self.settings_path = self.home / "gateway.toml"
        self.settings = settings
        self.endpoint: EndpointDaemon | None = None

    def write_settings(self, **overrides) -> None:
        """Write the gateway's settings file (its functions read it at every call), with
        ``overrides`` of the node's own settings: an operator reconfiguring the node."""
        from scistream_gateway.settings import GatewaySettings

        self.settings_path.write_text(GatewaySettings(
            name=self.name, state_dir=self.state_dir, port_min=PORTS[0], port_max=PORTS[1],
            **{**self.settings, **overrides}).to_toml())
        shutil.chown(self.settings_path, self.user, self.user)

    def start(self) -> None:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", self.user], check=True, capture_output=True)
        self.home.mkdir(mode=0o700)
        self.state_dir.mkdir(mode=0o700)
        shutil.chown(self.home, self.user, self.user)
        shutil.chown(self.state_dir, self.user, self.user)
        self.write_settings()
        self.endpoint = EndpointDaemon(
            self.name, home=self.home, env=self.fed.globus_env(self.home / "globus"),
            functions=self.fed.functions, settings=self.settings_path, user=self.user,
            argv_prefix=self.fed.world.argv_prefix(self.ns))
        shutil.chown(self.home / "globus", self.user, self.user)
        self.endpoint.configure()
        self.endpoint.start()

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()

    def remove_user(self) -> str:
        """Delete the node's Unix user (once nothing of it runs); the error, if any."""
        done = subprocess.run(["userdel", self.user], capture_output=True, text=True)
        return done.stderr.strip() if done.returncode not in (0, 6) else ""  # 6: no user

    def block(self) -> dict:
        """This gateway as a flow parameter (a GlobusComputeGateway block's fields)."""
        return {"endpoint_id": self.endpoint.endpoint_id, "display_name": self.name,
                "function_ids": json.loads(self.fed.functions.read_text()),
                "credentials_block": CREDENTIALS_BLOCK}

    def tls(self, uid: str) -> bool:
        """Whether this gateway's record of stream ``uid`` says TLS between the gateways."""
        with sqlite3.connect(self.state_dir / "state.sqlite3") as db:
            row = db.execute("SELECT tls FROM streams WHERE uid = ?", (uid,)).fetchone()
        return bool(row and row[0])

    def left(self) -> dict:
        """What streams left on this node: relay processes, bound ports of its range,
        stream directories (keys), rows. Empty when nothing is."""
        from scistream_proxy.leaks import proxy_pids

        report: dict = {}
        if pids := proxy_pids(under=self.state_dir):
            report["processes"] = pids
        done = self.fed.world.run(self.ns, ["ss", "-Htln"], capture_output=True, text=True)
        bound = [line.split()[3] for line in done.stdout.splitlines() if line.split()]
        if ports := [a for a in bound if PORTS[0] <= int(a.rpartition(":")[2]) <= PORTS[1]]:
            report["ports"] = ports
        streams = self.state_dir / "streams"
        if streams.is_dir() and (keys := sorted(p.name for p in streams.iterdir())):
            report["keys"] = keys
        database = self.state_dir / "state.sqlite3"
        if database.exists():
            with sqlite3.connect(database) as db:
                rows = db.execute("SELECT count(*) FROM streams WHERE state != 'RELEASED'"
                                  ).fetchone()[0] + db.execute(
                                  "SELECT count(*) FROM ports").fetchone()[0]
            if rows:
                report["rows"] = rows
        return report


class Federation:
    """The whole world, built by ``start()`` and removed by ``stop()``, which returns
    what remained (``{}`` when clean). ``delay_ms`` holds every request to the web
    service that long (the distance to the cloud)."""

    def __init__(self, root: Path, *, delay_ms: int = 0):
        self.root = root
        self.delay_ms = delay_ms
        self.world = World()
        self.broker: Broker | None = None
        self.auth: AuthService | None = None
        self.compute: ComputeService | None = None
        self.nodes: dict[str, GatewayNode] = {}
        self.prefect: PrefectWorld | None = None
        self.functions = root / "functions.json"

    def globus_env(self, home: Path) -> dict:
        return globus_env(home, self.auth.url, self.auth.clients["pipeline"])

    def start(self) -> Federation:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # the gateway nodes' Unix users reach their homes inside
        self.world.build()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cloud = self.world.argv_prefix("cloud")
        for ns in ("fac-p", "fac-c", "user"):
            self.world.forward_localhost(ns, COMPUTE_PORT)
        self.broker = Broker(host=CLOUD, argv_prefix=cloud, root=self.root / "broker").start()
        self.auth = AuthService(["compute", "pipeline"], host=CLOUD, argv_prefix=cloud,
                                workdir=self._dir("auth"))
        self.compute = ComputeService(self.broker, self.auth, host=CLOUD, port=COMPUTE_PORT,
                                      delay_ms=self.delay_ms,
                                      amqp_address=f"{CLOUD}:{self.broker.amqp_port}",
                                      argv_prefix=cloud, workdir=self._dir("compute"))
        register_functions(self.functions, self.globus_env(self._dir("operator")),
                           self.world.argv_prefix("fac-p"))
        self.functions.chmod(0o644)
        self.nodes["P"] = GatewayNode(self, "fac-p", "facility-p", {
            "lan_address": P_LAN, "wan_address": P_WAN, "wan_advertise_address": P_PUBLIC})
        self.nodes["C"] = GatewayNode(self, "fac-c", "facility-c", {
            "lan_address": C_LAN, "wan_address": C_WAN})
        for node in self.nodes.values():
            node.start()
        user_home = self._dir("user")
        self.prefect = PrefectWorld(self.world, self.root / "prefect",
                                    user_env=self.user_env(user_home)).start()
        client_id, secret = self.auth.clients["pipeline"]
        self.prefect.python(
            "import json, os\n"
            "from scistream_prefect.auth import GlobusCredentials\n"
            "GlobusCredentials(client_id=os.environ['WORLD_CLIENT_ID'],\n"
            "                  client_secret=os.environ['WORLD_CLIENT_SECRET'])"
            f".save({CREDENTIALS_BLOCK!r}, overwrite=True)\n"
            "print(json.dumps({}))", WORLD_CLIENT_ID=client_id, WORLD_CLIENT_SECRET=secret)
        # Each endpoint starts its workers at its first task: paid here, not by a setup.
        for node in self.nodes.values():
            call(self, node, "gateway_info", {})

    def user_env(self, home: Path) -> dict:
        """What the user's processes (worker, flow runs, the CLI) need of the Globus
        world: the local environment, Auth at the stand-in, their own HOME and
        SciStream client key; no client secret (that is in the credentials block)."""
        env = {k: v for k, v in self.globus_env(home).items()
               if k.startswith("GLOBUS_") and "CLIENT" not in k}
        env.update(HOME=str(home), SCISTREAM_CONFIG_DIR=str(home / "scistream"))
        return env

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def stop(self) -> dict:
        """Stop everything, remove the world; return what remained."""
        left: dict = {}
        for node in self.nodes.values():
            if node_left := node.left():
                left[node.name] = node_left
        if self.prefect is not None:
            self.prefect.stop()
        for node in self.nodes.values():
            node.stop()
        for service in (self.compute, self.auth, self.broker):
            if service is not None:
                service.stop()
        # Whatever still runs or listens in a namespace now is killed with it: reported.
        if world_left := {k: v for k, v in self.world.left().items() if k != "namespaces"}:
            left["world"] = world_left
        self.world.teardown()
        if world_left := self.world.left():
            left["after_teardown"] = world_left
        if users := [e for node in self.nodes.values() if (e := node.remove_user())]:
            left["users"] = users
        return left

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# Runs a deployment from the user namespace and prints the run's outcome and its task
# runs' times (what the setup's sequential round trips are counted from).
_RUN = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=900)
with get_client(sync_client=True) as client:
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
print(json.dumps({"state": run.state.type.value, "message": run.state.message,
                  "seconds": run.total_run_time.total_seconds(),
                  "tasks": [[t.name, t.start_time.timestamp(), t.end_time.timestamp()]
                            for t in tasks if t.start_time and t.end_time]}))
"""
# One gateway call from user, as the flows make it: block fields, function, request.
_CALL = """
import json, sys
from scistream_prefect.compute import GlobusComputeGateway
gateway = GlobusComputeGateway(**json.loads(sys.argv[1]))
print(json.dumps(gateway.call(sys.argv[2], json.loads(sys.argv[3]))))
"""


def call(fed: Federation, node: GatewayNode, function: str, request: dict) -> dict:
    """``function`` on ``node``'s endpoint, from user, with the pipeline's credentials."""
    return fed.prefect.python(_CALL, json.dumps(node.block()), function, json.dumps(request))


def round_trips(tasks: list) -> int:
    """Sequential waves of gateway calls (task runs named ``verb-compute:gateway``): a
    call that starts after every call of the current wave has ended begins the next."""
    waves, wave_end = 0, None
    calls = [t for t in tasks if "-compute:" in t[0]]
    for _, start, end in sorted(calls, key=lambda t: t[1]):
        if wave_end is None or start >= wave_end:
            waves += 1
            wave_end = end
        else:
            wave_end = max(wave_end, end)
    return waves


def stream_end_to_end(fed: Federation, nbytes: int, num_conn: int = 4, rate: int = 0,
                      during: Callable[[], None] | None = None) -> dict:
    """A deployment run from user opens a TLS stream from P to C (``rate`` in kbit/s,
    0: unlimited); the consumer app in app-c reads ``nbytes`` from the producer app in
    app-p through it (a checksum per connection), while ``during()`` runs; a second run
    releases it. Returns the summary's figures."""
    world, p, c = fed.world, fed.nodes["P"], fed.nodes["C"]
    producer = world.popen("app-p", [sys.executable, "-m", "scistream_proxy.apps", "producer",
                                     "--listen", f"{APP_P}:0", "--connections",
                                     str(num_conn), "--bytes", str(nbytes)],
                           stdout=subprocess.PIPE, text=True)
    try:
        app_listeners = json.loads(producer.stdout.readline())["listening"]
        uid = str(uuid.uuid4())
        opened = _run(fed, "open-stream/scistream", {
            "producer": p.block(), "consumer": c.block(), "num_conn": num_conn,
            "app_listeners": app_listeners, "uid": uid, "tls": True, "rate": rate})
        try:
            status = call(fed, c, "status", {"uid": uid})
            wan_listeners = call(fed, p, "status", {"uid": uid})["listeners"]
            started = time.perf_counter()
            consumer = world.popen("app-c", [sys.executable, "-m", "scistream_proxy.apps",
                                             "consumer", *status["listeners"], "--timeout",
                                             "120"], stdout=subprocess.PIPE, text=True)
            try:
                if during is not None:
                    during()
                consumed_out = consumer.communicate(timeout=3600)[0]
            finally:
                if consumer.poll() is None:
                    consumer.kill()
                    consumer.wait()
            seconds = time.perf_counter() - started
            produced = json.loads(producer.communicate(timeout=120)[0].strip()
                                  .splitlines()[-1])
            tls = p.tls(uid) and c.tls(uid)
        finally:
            released = _run(fed, "release-stream/scistream", {
                "producer": p.block(), "consumer": c.block(), "uid": uid})
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    consumed = json.loads(consumed_out.strip().splitlines()[-1])

    def digests(result: dict) -> list:
        return sorted((r.get("bytes"), r.get("sha256")) for r in result["connections"])

    received = sum(r.get("bytes", 0) for r in consumed["connections"])
    return {
        "bytes": received,
        "checksum_ok": received == nbytes and digests(produced) == digests(consumed),
        "checksum": hashlib.sha256(json.dumps(digests(consumed)).encode()).hexdigest()[:16],
        "connections": num_conn,
        "wan_listeners": wan_listeners,
        "tls": tls,
        "setup_s": round(opened["seconds"], 3),
        "setup_round_trips": round_trips(opened["tasks"]),
        "transfer_s": round(seconds, 3),
        "gbit_s": round(received * 8 / seconds / 1e9, 3),
        "opened": opened["state"], "released": released["state"],
        "left": {node.name: node.left() for node in (p, c) if node.left()},
    }


def _run(fed: Federation, deployment: str, parameters: dict) -> dict:
    out = fed.prefect.python(_RUN, deployment, json.dumps(parameters))
    if out["state"] != "COMPLETED":
        raise RuntimeError(f"{deployment}: {out['state']} {out['message']}\n"
                           f"{fed.prefect.worker.tail()}")
    return out

