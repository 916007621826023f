"""The federation: the world's network with everything in it (the cloud's stand-ins, a
real RabbitMQ, a real endpoint daemon on each gateway node, a Prefect server and worker),
and a stream end to end through it, as the tests, ``make federation`` and a bench run it.

Who is who, as confidential clients of the Auth stand-in:

- ``pipeline``, the pipeline author: the identity of the flows' ``GlobusCredentials``;
  it owns gateway P's single-user endpoint (which runs only its owner's tasks) and is
  mapped to a Unix user of its own on gateway C.
- ``other``, a second user of gateway C, mapped to another Unix user there.
- ``operator``, C's operator: owns C's multi-user endpoint (the manager, run as root),
  which runs each mapped identity's functions as that identity's Unix user.

Each (node, identity) has its own Unix user, home, gateway settings (0600) and state
directory (0700), all owned by that user. On C the two users get different slices of
the port range, as endpoint_configs/multi_user/ tells operators to give them: one
user's streams cannot use up the other's ports, and a bound port tells whose it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from world.auth_service import AuthService
from world.broker import Broker
from world.compute_service import ComputeService
from world.endpoints import EndpointDaemon, globus_env, register_functions
from world.netns import APP_P, C_LAN, C_WAN, CLOUD, P_LAN, P_PUBLIC, P_WAN, World
from world.prefect_world import PrefectWorld

__all__ = ["Federation", "GatewayNode", "GatewayUser", "call", "calls", "credentials_block",
           "round_trips", "run_completed", "run_deployment", "stream_end_to_end"]

COMPUTE_PORT = 5000  # the Compute SDK's `local` environment: http://localhost:5000
# Each identity's slice of a gateway's port range (the same on P and on C).
PORTS = {"pipeline": (40000, 40099), "other": (40100, 40199)}


def credentials_block(identity: str) -> str:
    """The name of ``identity``'s GlobusCredentials block on the Prefect server."""
    return f"world-{identity}"


class GatewayUser:
    """One Unix user's gateway on a node: the Globus identity mapped to it, its home
    (0700; its user endpoint's files live there), settings file (0600) and state
    directory (0700), all owned by the user, and its slice of the node's ports."""

    def __init__(self, node: GatewayNode, identity: str):
        self.node, self.identity = node, identity
        self.unix = f"ssw{node.fed.world.token}{node.ns[-1]}-{identity}"
        self.home = node.home / identity
        self.state_dir = self.home / "state"
        self.settings_path = node.home / "settings" / f"{self.unix}.toml"
        self.ports = PORTS[identity]
        # On a multi-user node the name says whose gateway answered.
        self.gateway_name = f"{node.name}-{identity}" if node.multi_user else node.name

    def create(self) -> None:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                        str(self.home), "--shell", "/usr/sbin/nologin", self.unix],
                       check=True, capture_output=True)
        for path in (self.home, self.state_dir):
            path.mkdir(mode=0o700)
            shutil.chown(path, self.unix, self.unix)
        self.write_settings()

    def write_settings(self, **overrides) -> None:
        from scistream_gateway.settings import GatewaySettings

        text = GatewaySettings(
            name=self.gateway_name, state_dir=self.state_dir, port_min=self.ports[0],
            port_max=self.ports[1], **{**self.node.settings, **overrides}).to_toml()
        fd = os.open(self.settings_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        shutil.chown(self.settings_path, self.unix, self.unix)

    def processes(self) -> list[int]:
        """Pids of every process running as this Unix user."""
        try:
            uid = pwd.getpwnam(self.unix).pw_uid
        except KeyError:
            return []
        return [int(p.name) for p in Path("/proc").glob("[0-9]*")
                if _owner(p) == uid]

    def remove(self) -> str:
        """Delete the Unix user (once nothing of it runs); the error, if any."""
        done = subprocess.run(["userdel", self.unix], capture_output=True, text=True)
        return done.stderr.strip() if done.returncode not in (0, 6) else ""  # 6: no user


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def _owner(proc: Path) -> int | None:
    """The real uid of a process (not its /proc directory's owner, which is root for
    a process that changed its uid, such as a user endpoint)."""
    try:
        status = (proc / "status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines()
                 if line.startswith("Uid:")), None)


class GatewayNode:
    """A gateway node: its endpoint daemon and its users (:class:`GatewayUser`, by
    identity). Single-user (P), the endpoint runs as its one user; multi-user (C), the
    manager runs as root with an identity mapping of the users' identities to them."""

    def __init__(self, fed: Federation, ns: str, name: str, settings: dict,
                 identities: tuple[str, ...], multi_user: bool = False):
        self.fed, self.ns, self.name = fed, ns, name
        self.home = fed.root / ns
        self.settings = settings
        self.multi_user = multi_user
        self.users = {identity: GatewayUser(self, identity) for identity in identities}
        self.endpoint: EndpointDaemon | None = None

    def write_settings(self, **overrides) -> None:
        """Write every user's settings file (their functions read it at every call),
        with ``overrides`` of the node's own settings: an operator reconfiguring it."""
        for user in self.users.values():
            user.write_settings(**overrides)

    def start(self) -> None:
        self.home.mkdir(mode=0o711)  # root's; each user's home inside is the user's own
        (self.home / "settings").mkdir(mode=0o711)
        for user in self.users.values():
            user.create()
        argv_prefix = self.fed.world.argv_prefix(self.ns)
        if self.multi_user:
            manager = self.home / "manager"
            manager.mkdir(mode=0o700)
            mapping = self.home / "identity_mapping.json"
            mapping.write_text(json.dumps([{
                "DATA_TYPE": "expression_identity_mapping#1.0.0",
                "mappings": [{"source": "{username}",
                              "match": self.fed.auth.clients[user.identity][0]
                              + r"@clients\.auth\.globus\.org",
                              "output": user.unix} for user in self.users.values()]}]))
            self.endpoint = EndpointDaemon(
                self.name, home=manager, env=self.fed.globus_env(manager / "globus", "operator"),
                functions=self.fed.functions, multi_user=True,
                settings_dir=self.home / "settings", identity_mapping=mapping,
                argv_prefix=argv_prefix)
        else:
            (owner,) = self.users.values()
            self.endpoint = EndpointDaemon(
                self.name, home=owner.home,
                env=self.fed.globus_env(owner.home / "globus", owner.identity),
                functions=self.fed.functions, settings=owner.settings_path, user=owner.unix,
                argv_prefix=argv_prefix)
            shutil.chown(owner.home / "globus", owner.unix, owner.unix)
        self.endpoint.configure()
        self.endpoint.start()

    def stop(self, timeout_s: float = 30.0) -> dict[int, str]:
        """Stop the endpoint; its users' processes (user endpoints, workers) end with
        it. Those still running after ``timeout_s``: pid -> command line."""
        if self.endpoint is not None:
            self.endpoint.stop()
        deadline = time.monotonic() + timeout_s
        while (pids := [pid for user in self.users.values() for pid in user.processes()]
               ) and time.monotonic() < deadline:
            time.sleep(0.2)
        return {pid: _cmdline(pid) for pid in pids}

    def block(self, identity: str = "pipeline") -> dict:
        """This gateway as a flow parameter (a GlobusComputeGateway block's fields), called
        with ``identity``'s credentials."""
        return {"endpoint_id": self.endpoint.endpoint_id, "display_name": self.name,
                "function_ids": json.loads(self.fed.functions.read_text()),
                "credentials_block": credentials_block(identity)}

    def tls(self, uid: str) -> bool:
        """Whether the pipeline's gateway's record of stream ``uid`` says TLS between
        the gateways."""
        database = self.users["pipeline"].state_dir / "state.sqlite3"
        with sqlite3.connect(database) as db:
            row = db.execute("SELECT tls FROM streams WHERE uid = ?", (uid,)).fetchone()
        return bool(row and row[0])

    def left(self) -> dict:
        """What streams left on this node, for all its users: relay processes, bound
        ports of their ranges, stream directories (keys, as ``identity/uid``), rows.
        Empty when nothing is."""
        from scistream_proxy.leaks import proxy_pids

        report: dict = {}
        done = self.fed.world.run(self.ns, ["ss", "-Htln"], capture_output=True, text=True)
        bound = [int(line.split()[3].rpartition(":")[2]) for line in done.stdout.splitlines()
                 if line.split()]
        if ports := [port for port in bound for user in self.users.values()
                     if user.ports[0] <= port <= user.ports[1]]:
            report["ports"] = ports
        for user in self.users.values():
            if pids := proxy_pids(under=user.state_dir):
                report.setdefault("processes", []).extend(pids)
            streams = user.state_dir / "streams"
            if streams.is_dir() and (keys := sorted(p.name for p in streams.iterdir())):
                report.setdefault("keys", []).extend(f"{user.identity}/{k}" for k in keys)
            database = user.state_dir / "state.sqlite3"
            if database.exists():
                with sqlite3.connect(database) as db:
                    rows = db.execute("SELECT count(*) FROM streams WHERE state != 'RELEASED'"
                                      ).fetchone()[0] + db.execute(
                                      "SELECT count(*) FROM ports").fetchone()[0]
                if rows:
                    report["rows"] = report.get("rows", 0) + rows
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

    def globus_env(self, home: Path, identity: str = "pipeline") -> dict:
        return globus_env(home, self.auth.url, self.auth.clients[identity])

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
        self.auth = AuthService(["compute", "pipeline", "other", "operator"], host=CLOUD,
                                argv_prefix=cloud, workdir=self._dir("auth"))
        self.compute = ComputeService(self.broker, self.auth, host=CLOUD, port=COMPUTE_PORT,
                                      delay_ms=self.delay_ms,
                                      amqp_address=f"{CLOUD}:{self.broker.amqp_port}",
                                      argv_prefix=cloud, workdir=self._dir("compute"))
        register_functions(self.functions, self.globus_env(self._dir("operator")),
                           self.world.argv_prefix("fac-p"))
        self.functions.chmod(0o644)
        self.nodes["P"] = GatewayNode(self, "fac-p", "facility-p", {
            "lan_address": P_LAN, "wan_address": P_WAN, "wan_advertise_address": P_PUBLIC},
            ("pipeline",))
        self.nodes["C"] = GatewayNode(self, "fac-c", "facility-c", {
            "lan_address": C_LAN, "wan_address": C_WAN}, ("pipeline", "other"),
            multi_user=True)
        for node in self.nodes.values():
            node.start()
        user_home = self._dir("user")
        self.prefect = PrefectWorld(self.world, self.root / "prefect",
                                    user_env=self.user_env(user_home)).start()
        for identity in ("pipeline", "other"):
            client_id, secret = self.auth.clients[identity]
            self.prefect.python(
                "import json, os, sys\n"
                "from scistream_prefect.auth import GlobusCredentials\n"
                "GlobusCredentials(client_id=os.environ['WORLD_CLIENT_ID'],\n"
                "                  client_secret=os.environ['WORLD_CLIENT_SECRET'])"
                ".save(sys.argv[1], overwrite=True)\n"
                "print(json.dumps({}))", credentials_block(identity),
                WORLD_CLIENT_ID=client_id, WORLD_CLIENT_SECRET=secret)
        # Each endpoint (on C, each identity's user endpoint) starts its workers at its
        # first task: paid here, not by a setup. Each reply names whose gateway answered.
        users = [user for node in self.nodes.values() for user in node.users.values()]
        with ThreadPoolExecutor(len(users)) as pool:
            names = list(pool.map(lambda u: call(self, u.node, "gateway_info", {},
                                                 identity=u.identity)["name"], users))
        if names != [user.gateway_name for user in users]:
            raise RuntimeError(f"identities reached the wrong gateways: {names}")

    def user_env(self, home: Path) -> dict:
        """What the user's processes (worker, flow runs, the CLI) need of the Globus
        world: the local environment, Auth at the stand-in, their own HOME and
        SciStream client key; no client secret (that is in the credentials blocks)."""
        env = {k: v for k, v in self.globus_env(home).items()
               if k.startswith("GLOBUS_") and "CLIENT" not in k}
        env.update(HOME=str(home), SCISTREAM_CONFIG_DIR=str(home / "scistream"))
        return env

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def stop(self) -> dict:
        """Stop everything, remove the world and the Unix users; return what remained."""
        left: dict = {}
        for node in self.nodes.values():
            if node_left := node.left():
                left[node.name] = node_left
        if self.prefect is not None:
            self.prefect.stop()
        for node in self.nodes.values():
            if processes := node.stop():
                left.setdefault(node.name, {})["user_processes"] = processes
        for service in (self.compute, self.auth, self.broker):
            if service is not None:
                service.stop()
        # Whatever still runs or listens in a namespace now is killed with it: reported.
        if world_left := {k: v for k, v in self.world.left().items() if k != "namespaces"}:
            left["world"] = world_left
        self.world.teardown()
        if world_left := self.world.left():
            left["after_teardown"] = world_left
        if users := [e for node in self.nodes.values() for user in node.users.values()
                     if (e := user.remove())]:
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
# Gateway calls from user, one after another in one process, as the flows make them:
# block fields, then [function, request] pairs; each reply, or its error as on the wire.
_CALLS = """
import json, sys
from scistream_prefect import SciStreamError
from scistream_prefect.compute import GlobusComputeGateway
gateway = GlobusComputeGateway(**json.loads(sys.argv[1]))
replies = []
for function, request in json.loads(sys.argv[2]):
    try:
        replies.append(gateway.call(function, request))
    except SciStreamError as exc:
        replies.append(exc.to_wire())
print(json.dumps(replies))
"""


def calls(fed: Federation, node: GatewayNode, requests: list[tuple[str, dict]],
          identity: str = "pipeline") -> list[dict]:
    """``(function, request)`` pairs on ``node``'s endpoint, from user, with
    ``identity``'s credentials; each reply, or ``{"error": {"code", "message"}}``."""
    return fed.prefect.python(_CALLS, json.dumps(node.block(identity)), json.dumps(requests))


def call(fed: Federation, node: GatewayNode, function: str, request: dict,
         identity: str = "pipeline") -> dict:
    """``function`` on ``node``'s endpoint, from user, with ``identity``'s credentials;
    its reply (an error reply raises ``RuntimeError``)."""
    (reply,) = calls(fed, node, [(function, request)], identity)
    if "error" in reply:
        raise RuntimeError(f"{function} on {node.name} as {identity}: {reply['error']}")
    return reply


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
        opened = run_completed(fed, "open-stream/scistream", {
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
            released = run_completed(fed, "release-stream/scistream", {
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


def run_deployment(fed: Federation, deployment: str, parameters: dict) -> dict:
    """Run ``deployment`` from user and wait for it: its final ``state``, ``message``,
    ``seconds`` and task runs (``tasks``: name, start, end)."""
    return fed.prefect.python(_RUN, deployment, json.dumps(parameters))


def run_completed(fed: Federation, deployment: str, parameters: dict) -> dict:
    """``run_deployment``, raising unless the run Completed (with the worker's log)."""
    out = run_deployment(fed, deployment, parameters)
    if out["state"] != "COMPLETED":
        raise RuntimeError(f"{deployment}: {out['state']} {out['message']}\n"
                           f"{fed.prefect.worker.tail()}")
    return out
