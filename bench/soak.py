"""Randomized fault soak of the gateway side: stream lifecycles with injected faults.

    .venv/bin/python bench/soak.py --lifecycles 1000 --seed 1 \
        --backends native,stunnel,haproxy,nginx --concurrency 4 [--port-base 10000] [--json]

Each of ``--concurrency`` slots owns a pair of local gateways per backend (LocalPair:
real worker processes, the Globus Compute serializer, SQLite, real proxies) and runs
lifecycles one after another: reserve ‖ reserve, hello, connect ‖ connect, a
checksummed echo through the chain, release; each end's backend drawn from
``--backends`` (the producer end from one pair, the consumer end from another), and
one fault drawn per lifecycle:

- ``none``; ``kill-proxy`` (SIGKILL one end's proxy mid-transfer);
- ``worker-death`` (a worker SIGKILLs itself at a fault point of reserve or connect,
  see ``scistream_gateway.service.FAULT_STEPS``; the client then retries or releases);
- ``call-timeout`` (a call with a random timeout of 5-500 ms: the client kills the
  worker wherever it got to);
- ``client-vanishes`` (renewed for 1 s, never released); ``restart`` (every worker of both
  gateways killed, maybe a proxy killed or an orphan planted, meanwhile);
- ``peer-unreachable``; ``wrong-key`` (hello); ``wrong-cert`` (an impostor's certificate).

After each lifecycle one more call goes to both gateways (it reaps what the fault left),
then :func:`check_gateway` checks the invariants on each: no process, port, relay
stream, container, key or stream directory without a live stream; no row half done;
the state database matches the processes. ``violations`` must be 0; ``unexpected`` lists
outcomes that differ from what the fault should give (also goal 0).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import random
import secrets
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Workers inherit this: the gateways honour fault files under <state_dir>/test-faults/.
os.environ["SCISTREAM_TEST_FAULTS"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from scistream_gateway.errors import (  # noqa: E402
    AuthError,
    InvalidUid,
    SciStreamError,
    Timeout,
    Unavailable,
)
from scistream_gateway.service import FAULT_STEPS  # noqa: E402
from scistream_prefect import LocalGateway, LocalPair  # noqa: E402
from scistream_proxy.apps import EchoServer  # noqa: E402
from scistream_proxy.backends import BACKENDS  # noqa: E402
from scistream_proxy.leaks import port_is_free, runs_a_proxy, working_dirs  # noqa: E402
from scistream_proxy.native_backend import NativeBackend  # noqa: E402
from scistream_proxy.process import ProcessIdentity  # noqa: E402
from scistream_proxy.tls import generate_certificate  # noqa: E402

HOST_BACKENDS = ("native", "stunnel", "haproxy", "nginx")
CONTAINER_BACKENDS = ("haproxy-docker", "nginx-docker")
FAULTS = {  # kind: weight
    "none": 2, "kill-proxy": 2, "worker-death": 4, "call-timeout": 3, "client-vanishes": 1,
    "restart": 2, "peer-unreachable": 1, "wrong-key": 1, "wrong-cert": 1,
}
LIVE = ("RESERVED", "HELLO", "CONNECTED")  # a proxy (or port holder) must run
HOLDING = (*LIVE, "FAILED")  # not released yet: may still hold files and ports
PORTS_PER_GATEWAY = 16
ECHO_BYTES = 256 * 1024


# -- invariants ---------------------------------------------------------------------------
def _rows(state_dir: Path) -> tuple[dict, list[tuple[int, str]]]:
    db = sqlite3.connect(f"file:{state_dir / 'state.sqlite3'}?mode=ro", uri=True, timeout=60)
    try:
        db.row_factory = sqlite3.Row
        rows = {r["uid"]: dict(r) for r in db.execute("SELECT * FROM streams")}
        ports = [tuple(r) for r in db.execute("SELECT port, uid FROM ports")]
    finally:
        db.close()
    for row in rows.values():
        for key in ("proxy", "busy"):
            row[key] = json.loads(row[key]) if row.get(key) else None
    return rows, ports


def _identity(record: dict | None) -> ProcessIdentity | None:
    if not record or not record.get("pid"):
        return None
    return ProcessIdentity(int(record["pid"]), int(record["start_time"]))


def check_gateway(state_dir: Path, host: str, port_range: tuple[int, int],
                  docker: bool = False) -> list[str]:
    """Every invariant of one idle gateway; returns the violations (empty: none)."""
    where = state_dir.name
    violations = []
    if not (state_dir / "state.sqlite3").exists():
        return violations
    rows, ports = _rows(state_dir)
    streams_dir = state_dir / "streams"
    for uid, row in rows.items():
        if row["state"] == "STARTING" or row.get("busy"):
            violations.append(f"{where}: stream {uid} half done ({row['state']}, busy "
                              f"{row.get('busy')})")
    held_ports = {}
    for port, uid in ports:
        if rows.get(uid, {}).get("state") not in HOLDING:
            violations.append(f"{where}: port {port} recorded for {uid} "
                              f"({rows.get(uid, {}).get('state')})")
        held_ports[port] = uid
    # Stream directories (keys, configs, sockets) only for streams not yet released.
    if streams_dir.is_dir():
        for directory in streams_dir.iterdir():
            if rows.get(directory.name, {}).get("state") not in HOLDING:
                violations.append(f"{where}: directory streams/{directory.name} without a "
                                  f"live stream ({rows.get(directory.name, {}).get('state')})")
    # Processes working in a stream directory: holders and external proxies.
    for pid, cwd in working_dirs(streams_dir).items():
        uid = Path(cwd).relative_to(streams_dir).parts[0] if cwd != str(streams_dir) else ""
        if rows.get(uid, {}).get("state") not in HOLDING:
            violations.append(f"{where}: process {pid} in streams/{uid} without a live stream")
    # The native relay: alive iff a live native stream exists; it holds exactly those.
    native_live = {uid for uid, r in rows.items()
                   if r["backend"] == "native" and r["state"] in LIVE}
    relays = [pid for pid in working_dirs(state_dir / "relay") if runs_a_proxy(pid)]
    if len(relays) > 1:
        violations.append(f"{where}: {len(relays)} native relays run: {relays}")
    if relays and not native_live:
        violations.append(f"{where}: native relay {relays} runs without a live native stream")
    held = NativeBackend.relay_streams(state_dir) or []
    for uid in set(held) - native_live:
        violations.append(f"{where}: relay holds {uid} "
                          f"({rows.get(uid, {}).get('state')}), not a live stream")
    for uid in native_live - set(held):
        violations.append(f"{where}: live native stream {uid} not in the relay")
    # Every live stream's recorded proxy (or port holder) runs, and holds its ports.
    for uid, row in rows.items():
        if row["state"] not in LIVE:
            continue
        handle = row["proxy"] or {}
        if handle.get("container"):
            continue  # checked with the engine below
        identity = _identity(handle) or _identity(handle.get("holder"))
        if identity is None or not identity.alive():
            violations.append(f"{where}: live stream {uid} ({row['state']}): its recorded "
                              f"process {identity} is not running")
        for address in json.loads(row["listeners"]):
            if port_is_free(address):
                violations.append(f"{where}: live stream {uid}: nothing holds {address}")
    # No port of the range bound without a stream that holds it.
    for port in range(port_range[0], port_range[1] + 1):
        if port not in held_ports and not port_is_free(f"{host}:{port}"):
            violations.append(f"{where}: port {port} is bound, no stream holds it")
    if docker:
        violations += _check_containers(where, streams_dir, rows)
    return violations


def _check_containers(where: str, streams_dir: Path, rows: dict) -> list[str]:
    from scistream_proxy.docker_backends import docker_client, leftover_containers

    violations = []
    client = docker_client()
    try:
        seen = set()
        for container in leftover_containers(client):
            labels = container.labels
            if Path(labels.get("org.scistream.stream_dir", "/")).parent != streams_dir:
                continue
            uid = labels.get("org.scistream.uid", "")
            seen.add(uid)
            if rows.get(uid, {}).get("state") not in HOLDING:
                violations.append(f"{where}: container {container.name} without a live stream")
        for uid, row in rows.items():
            if row["state"] in LIVE and (row["proxy"] or {}).get("container") and uid not in seen:
                violations.append(f"{where}: live stream {uid}: its container is gone")
    finally:
        client.close()
    return violations


# -- the stand-in app (scistream_proxy.apps.EchoServer) -------------------------------------
def echo_roundtrip(address: str, nbytes: int = ECHO_BYTES, timeout_s: float = 30) -> str:
    """"ok" if ``nbytes`` came back intact, else what happened ("eof", "error: ...")."""
    payload = os.urandom(nbytes)
    host, _, port = address.rpartition(":")
    back = bytearray()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sender = threading.Thread(target=_send_quietly, args=(sock, payload), daemon=True)
            sender.start()
            while len(back) < nbytes:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return "eof"
                back += chunk
    except OSError as exc:
        return f"error: {type(exc).__name__}"
    return "ok" if hashlib.sha256(back).digest() == hashlib.sha256(payload).digest() else "corrupt"


def _send_quietly(sock: socket.socket, payload: bytes, errors: list | None = None) -> None:
    try:
        sock.sendall(payload)
    except OSError as exc:
        if errors is not None:
            errors.append(type(exc).__name__)


# -- lifecycles ----------------------------------------------------------------------------
class Ports:
    """Slices of the port range for the pairs of gateways, handed out once each."""

    def __init__(self, base: int, limit: int):
        self.next, self.limit = base, limit
        self.lock = threading.Lock()

    def take(self) -> int:
        """The first port of a pair's two ranges of ``PORTS_PER_GATEWAY``."""
        with self.lock:
            low = self.next
            self.next += 2 * PORTS_PER_GATEWAY
        if self.next - 1 > self.limit:
            raise RuntimeError(f"port range exhausted at {low} (limit {self.limit})")
        return low


def kill_workers(gw: LocalGateway) -> None:
    """SIGKILL every worker of ``gw``, as an endpoint restart does; return once they
    are dead (so the next call starts a new one instead of meeting a dying one)."""
    for pid in gw.worker_pids():
        fd = os.pidfd_open(pid)
        try:
            os.killpg(pid, signal.SIGKILL)
            select.select([fd], [], [], 10)
        finally:
            os.close(fd)


class Slot:
    """One lane of lifecycles: its own pair of gateways per backend, and app."""

    def __init__(self, root: Path, index: int, ports: Ports, rng: random.Random):
        self.root, self.index, self.ports, self.rng = root, index, ports, rng
        self.pairs: dict[str, LocalPair] = {}
        self.app = EchoServer()
        self.pool = ThreadPoolExecutor(2)

    def gateway(self, backend: str, role: str) -> LocalGateway:
        if backend not in self.pairs:
            name = f"s{self.index}-{backend}"
            self.pairs[backend] = LocalPair.create(
                self.root / name, name=name, port_base=self.ports.take(),
                ports=PORTS_PER_GATEWAY, backend=backend, workers=2, call_timeout_s=120)
        pair = self.pairs[backend]
        return pair.producer if role == "PROD" else pair.consumer

    def close(self) -> None:
        self.app.close()
        self.pool.shutdown()
        for pair in self.pairs.values():
            pair.close()

    # -- calls --------------------------------------------------------------------------
    def both(self, calls: list) -> list:
        """Run calls [(gw, function, request, timeout)] concurrently; exceptions returned."""
        def run(gw, function, request, timeout):
            try:
                return gw.call(function, request, timeout_s=timeout)
            except SciStreamError as exc:
                return exc
        futures = [self.pool.submit(run, *c) for c in calls]
        return [f.result() for f in futures]

    def release(self, gws, uid: str) -> list[str]:
        problems = []
        for gw in gws:
            for attempt in range(4):
                try:
                    gw.call("release", {"uid": uid})
                    break
                except (Unavailable, Timeout) as exc:
                    if attempt == 3:
                        problems.append(f"release on {gw.settings.name} failed: {exc}")
        return problems

    def open(self, P, C, uid: str, key: str, *, lease_s: int | None = None,
             timeouts: dict | None = None, cons_remote: list[str] | None = None,
             cons_peer: tuple[str, str] | None = None, hello_key: str | None = None):
        """reserve ‖ reserve, hello, connect ‖ connect; returns (consumer listeners, None)
        or (None, the first error and the step it came at)."""
        timeouts = timeouts or {}
        request = {"uid": uid, "num_conn": 1,
                   "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
        if lease_s:
            request["lease_s"] = lease_s
        prod, cons = self.both([
            (P, "reserve", {**request, "role": "PROD"}, timeouts.get(("reserve", "PROD"))),
            (C, "reserve", {**request, "role": "CONS"}, timeouts.get(("reserve", "CONS"))),
        ])
        for reply in (prod, cons):
            if isinstance(reply, Exception):
                return None, ("reserve", reply)
        try:
            P.call("hello", {"uid": uid, "key": hello_key or key, "role": "PROD",
                             "app_listeners": [self.app.address]},
                   timeout_s=timeouts.get(("hello", "PROD")))
        except SciStreamError as exc:
            return None, ("hello", exc)
        cons_peer = cons_peer or (prod["certificate"], prod["cert_fingerprint"])
        replies = self.both([
            (P, "connect", {"uid": uid, "remote_listeners": cons["listeners"],
                            "peer_certificate": cons["certificate"],
                            "peer_fingerprint": cons["cert_fingerprint"]},
             timeouts.get(("connect", "PROD"))),
            (C, "connect", {"uid": uid, "remote_listeners": cons_remote or prod["listeners"],
                            "peer_certificate": cons_peer[0], "peer_fingerprint": cons_peer[1]},
             timeouts.get(("connect", "CONS"))),
        ])
        for reply in replies:
            if isinstance(reply, Exception):
                return None, ("connect", reply)
        return cons["listeners"], None

    # -- one lifecycle ----------------------------------------------------------------------
    def lifecycle(self, fault: str, backends: list[str]) -> tuple[str, list[str], list[str]]:
        """Run one lifecycle with ``fault``; returns (fault label, unexpected, touched
        gateway keys)."""
        rng = self.rng
        pb, cb = rng.choice(backends), rng.choice(backends)
        P, C = self.gateway(pb, "PROD"), self.gateway(cb, "CONS")
        uid, key = str(uuid.uuid4()), secrets.token_urlsafe(16)
        unexpected: list[str] = []
        label = fault
        release = True
        try:
            if fault == "none":
                listeners, failed = self.open(P, C, uid, key)
                if failed:
                    unexpected.append(f"open failed at {failed[0]}: {failed[1]}")
                elif (result := echo_roundtrip(listeners[0])) != "ok":
                    unexpected.append(f"echo through {pb}->{cb}: {result}")
            elif fault == "kill-proxy":
                label, problems = self._kill_proxy(P, C, uid, key, pb, cb)
                unexpected += problems
            elif fault == "worker-death":
                label, problems = self._worker_death(P, C, uid, key)
                unexpected += problems
            elif fault == "call-timeout":
                call = rng.choice([("reserve", "PROD"), ("reserve", "CONS"), ("hello", "PROD"),
                                   ("connect", "PROD"), ("connect", "CONS")])
                timeout = rng.uniform(0.005, 0.5)
                label = f"call-timeout:{call[0]}"
                listeners, failed = self.open(P, C, uid, key, timeouts={call: timeout})
                if failed and not isinstance(failed[1], (Timeout, Unavailable, InvalidUid)):
                    # InvalidUid: a connect after its peer's call was cut, e.g. a hello
                    # that timed out before it was recorded.
                    unexpected.append(f"{label}: {failed[1]!r}")
            elif fault == "client-vanishes":
                listeners, failed = self.open(P, C, uid, key)
                if failed:
                    unexpected.append(f"open failed at {failed[0]}: {failed[1]}")
                for gw in (P, C):  # its last renew asked for 1 s; then it is gone
                    gw.call("renew", {"uid": uid, "lease_s": 1})
                time.sleep(1.3)
                for gw in (P, C):
                    gw.call("gateway_info", {})
                    state = gw.call("status", {"uid": uid})["state"]
                    if state != "EXPIRED":
                        unexpected.append(f"lease ran out, {gw.settings.name} says {state}")
                release = False  # the client vanished
            elif fault == "restart":
                label, problems = self._restart(P, C, uid, key, pb, cb)
                unexpected += problems
            elif fault == "peer-unreachable":
                closed = socket.create_server(("127.0.0.1", 0))
                dead_end = f"127.0.0.1:{closed.getsockname()[1]}"
                closed.close()
                listeners, failed = self.open(P, C, uid, key, cons_remote=[dead_end])
                if failed:
                    unexpected.append(f"open failed at {failed[0]}: {failed[1]}")
                else:
                    result = echo_roundtrip(listeners[0], timeout_s=15)
                    if result == "ok":
                        unexpected.append("data went through an unreachable peer")
                    status = C.call("status", {"uid": uid})
                    if cb == "native" and "refused" not in str(status.get("last_error")):
                        unexpected.append(f"unreachable peer not in status: {status}")
            elif fault == "wrong-key":
                listeners, failed = self.open(P, C, uid, key, hello_key="not-" + key)
                if not (failed and failed[0] == "hello" and isinstance(failed[1], AuthError)):
                    unexpected.append(f"wrong hello key: {failed}")
                listeners, failed = self.open(P, C, uid, key)  # then the right one
                if failed or echo_roundtrip(listeners[0]) != "ok":
                    unexpected.append(f"after a wrong key the right one fails: {failed}")
            elif fault == "wrong-cert":
                listeners, failed = self.open(P, C, uid, key, cons_peer=self._impostor())
                if failed:
                    unexpected.append(f"open failed at {failed[0]}: {failed[1]}")
                elif (result := echo_roundtrip(listeners[0], timeout_s=15)) == "ok":
                    unexpected.append("data went to a peer with the wrong certificate")
            else:
                raise ValueError(fault)
        except SciStreamError as exc:
            unexpected.append(f"{label}: {exc!r}")
        finally:
            if release:
                unexpected += self.release((P, C), uid)
        return label, unexpected, [(pb, "PROD"), (cb, "CONS")]

    def _impostor(self) -> tuple[str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            return generate_certificate("impostor", Path(tmp) / "k.pem", Path(tmp) / "c.pem",
                                        datetime.timedelta(days=1))

    def _kill_proxy(self, P, C, uid, key, pb, cb) -> tuple[str, list[str]]:
        side, backend = self.rng.choice([(P, pb), (C, cb)])
        role = "PROD" if side is P else "CONS"
        label = f"kill-proxy:{role}:{backend}"
        problems: list[str] = []
        listeners, failed = self.open(P, C, uid, key)
        if failed:
            return label, [f"open failed at {failed[0]}: {failed[1]}"]
        host, _, port = listeners[0].rpartition(":")
        outcome: list[str] = []

        def stream() -> None:  # a transfer that runs until the proxy dies
            # A reset is reported once per socket, to the send or the recv: watch both.
            # Recorded before the socket closes (the sender then meets EBADF).
            errors: list[str] = []
            try:
                with socket.create_connection((host, int(port)), timeout=30) as sock:
                    sender = threading.Thread(target=_send_quietly,
                                              args=(sock, b"x" * (256 << 20), errors),
                                              daemon=True)
                    sender.start()
                    try:
                        while sock.recv(1 << 20):
                            pass
                        sender.join(timeout=5)
                    except OSError as exc:
                        errors.append(type(exc).__name__)
                    outcome.append(f"error: {errors[0]}" if errors else "eof")
            except OSError as exc:
                outcome.append(f"error: {type(exc).__name__}")

        mover = threading.Thread(target=stream, daemon=True)
        mover.start()
        time.sleep(0.2)
        pid = side.call("status", {"uid": uid}).get("pid")
        identity = ProcessIdentity.of(pid) if pid else None
        if identity is None:
            return label, [f"no proxy pid in {role} status"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while identity.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        status = side.call("status", {"uid": uid})
        # A container engine reports a container whose process was killed a moment later.
        deadline = time.monotonic() + 10
        while status["alive"] and backend in CONTAINER_BACKENDS and time.monotonic() < deadline:
            time.sleep(0.1)
            status = side.call("status", {"uid": uid})
        if (status["state"], status["alive"], status.get("error_code")) != (
                "FAILED", False, "CONN_ERROR"):
            problems.append(f"{label}: status {status['state']} alive={status['alive']} "
                            f"code={status.get('error_code')}")
        mover.join(timeout=10)
        # A native consumer resets its app when the producer's proxy dies. Not when that
        # is nginx: its worker outlives a killed master, and relays until release.
        # (Which error the app meets first depends on whether its send or its recv
        # learns of the reset: ECONNRESET, EPIPE, ENOTCONN. A clean "eof" is wrong.)
        if role == "PROD" and cb == "native" and pb != "nginx" \
                and not (outcome and outcome[0].startswith("error: ")):
            problems.append(f"{label}: a native consumer gave the app {outcome or 'nothing'},"
                            " not a reset")
        if mover.is_alive():  # nginx workers outlive a killed master: release ends them
            problems += self.release((P, C), uid)
            mover.join(timeout=30)
            if mover.is_alive():
                problems.append(f"{label}: the app's transfer hangs after release")
        return f"{label}:{outcome[0] if outcome else 'hang'}", problems

    def _worker_death(self, P, C, uid, key) -> tuple[str, list[str]]:
        step = self.rng.choice(FAULT_STEPS)
        side = self.rng.choice([P, C])
        retry = step.startswith("reserve") and self.rng.random() < 0.5
        label = f"worker-death:{step}:{'PROD' if side is P else 'CONS'}"
        faults = side.settings.state_dir / "test-faults"
        faults.mkdir(exist_ok=True)
        (faults / step).touch()
        problems: list[str] = []
        listeners, failed = self.open(P, C, uid, key)
        if (faults / step).exists():
            (faults / step).unlink()
            problems.append(f"{label}: fault point not reached ({failed})")
        elif (not failed or not isinstance(failed[1], Unavailable)
              or failed[0] != step.split(":")[0]):
            problems.append(f"{label}: expected UNAVAILABLE at {step}, got {failed}")
        if retry:  # the client tries the same uid again: the dead reserve was undone
            label += ":retried"
            listeners, failed = self.open(P, C, uid, key)
            if failed:
                problems.append(f"{label}: the retry failed at {failed[0]}: {failed[1]}")
            elif (result := echo_roundtrip(listeners[0])) != "ok":
                problems.append(f"{label}: echo after the retry: {result}")
        return label, problems

    def _restart(self, P, C, uid, key, pb, cb) -> tuple[str, list[str]]:
        what = self.rng.choice(["workers", "workers+proxy", "workers+orphan"])
        label = f"restart:{what}"
        problems: list[str] = []
        listeners, failed = self.open(P, C, uid, key)
        if failed:
            return label, [f"open failed at {failed[0]}: {failed[1]}"]
        killed = None
        orphan = None
        for gw in (P, C):
            kill_workers(gw)
        if what == "workers+proxy":
            killed = self.rng.choice([P, C])
            pid = killed.call("status", {"uid": uid})["pid"]
            # The status call above ran in a new worker (it reconciled, found all well);
            # kill that worker too, then the proxy, so the next worker meets a dead proxy.
            kill_workers(killed)
            identity = ProcessIdentity.of(pid)
            os.kill(pid, signal.SIGKILL)
            while identity and identity.alive():
                time.sleep(0.01)
        elif what == "workers+orphan":
            gw = self.rng.choice([P, C])
            orphan = gw.settings.state_dir / "streams" / str(uuid.uuid4())
            orphan.mkdir(mode=0o700)
            (orphan / "key.pem").write_text("left by a crash")
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                    cwd=orphan, start_new_session=True)
            orphan = (orphan, proc)
        for gw in (P, C):
            status = gw.call("status", {"uid": uid})
            want = ("FAILED", False) if gw is killed else ("CONNECTED", True)
            if (status["state"], status["alive"]) != want:
                problems.append(f"{label}: {gw.settings.name} says {status['state']} "
                                f"alive={status['alive']}, not {want}")
        if killed is None and (result := echo_roundtrip(listeners[0])) != "ok":
            problems.append(f"{label}: echo after restart: {result}")
        if orphan is not None:
            directory, proc = orphan
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                problems.append(f"{label}: the orphan process outlived reconciliation")
            if directory.exists():
                problems.append(f"{label}: the orphan directory outlived reconciliation")
        return label, problems


def run_soak(lifecycles: int, seed: int, backends: list[str], concurrency: int,
             port_base: int, port_limit: int, root: Path, progress=None) -> dict:
    """Run the soak; returns the report (see the module docstring)."""
    docker = any(b in CONTAINER_BACKENDS for b in backends)
    ports = Ports(port_base, port_limit)
    master = random.Random(seed)
    plan = [master.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
            for _ in range(lifecycles)]
    slots = [Slot(root, i, ports, random.Random(master.random())) for i in range(concurrency)]
    faults: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    violations: list[str] = []
    unexpected: list[str] = []
    lock = threading.Lock()
    queue = list(enumerate(plan))
    started = time.monotonic()
    done = [0]

    def lane(slot: Slot) -> None:
        while True:
            with lock:
                if not queue:
                    return
                index, fault = queue.pop(0)
            try:
                label, problems, touched = slot.lifecycle(fault, backends)
            except Exception:  # noqa: BLE001 - a harness failure is reported, not fatal
                label, problems, touched = fault, [traceback.format_exc(limit=5)], []
            # The next call on each gateway reaps what the fault left; then check.
            found = []
            for key in touched:
                gw = slot.gateway(*key)
                try:
                    gw.call("gateway_info", {})
                    s = gw.settings
                    found += check_gateway(s.state_dir, "127.0.0.1", (s.port_min, s.port_max),
                                           docker=docker and key[0] in CONTAINER_BACKENDS)
                except SciStreamError as exc:
                    found.append(f"gateway_info after {label}: {exc}")
                except Exception:  # noqa: BLE001 - a check that could not run is reported
                    problems.append(f"invariant check failed: {traceback.format_exc(limit=3)}")
            with lock:
                faults[label] += 1
                kinds[fault] += 1
                violations.extend(f"#{index} {label}: {v}" for v in found)
                unexpected.extend(f"#{index} {label}: {p}" for p in problems)
                for line in [*found, *problems]:  # as they happen, not only at the end
                    print(f"#{index} {label}: {line}", file=sys.stderr, flush=True)
                done[0] += 1
                if progress:
                    progress(done[0], lifecycles, len(violations), len(unexpected))

    threads = [threading.Thread(target=lane, args=(slot,)) for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot in slots:
        slot.close()
    return {
        "lifecycles": lifecycles,
        "seed": seed,
        "backends": backends,
        "concurrency": concurrency,
        "faults_injected": sum(n for k, n in kinds.items() if k != "none"),
        "faults_by_kind": dict(sorted(kinds.items())),
        "faults_by_detail": dict(sorted(faults.items())),
        "violations": violations,
        "unexpected": unexpected,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lifecycles", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backends", default="native,stunnel,haproxy,nginx",
                        help="comma-separated; the container ones need a Docker engine")
    parser.add_argument("--concurrency", type=int, default=2, help="lanes of lifecycles")
    parser.add_argument("--port-base", type=int, default=10000)
    parser.add_argument("--port-limit", type=int, default=12999)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    for name in backends:
        reason = BACKENDS[name].unavailable_reason()
        if reason:
            print(f"backend {name} is not usable here: {reason}", file=sys.stderr)
            return 2

    def progress(done: int, total: int, violations: int, unexpected: int) -> None:
        if done % 25 == 0 or done == total:
            print(f"{done}/{total} lifecycles, {violations} violations, {unexpected} unexpected",
                  file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="scistream-soak-") as tmp:
        report = run_soak(args.lifecycles, args.seed, backends, args.concurrency,
                          args.port_base, args.port_limit, Path(tmp), progress)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"lifecycles: {report['lifecycles']} (seed {report['seed']}, backends "
              f"{','.join(backends)}, concurrency {report['concurrency']})")
        print(f"faults injected: {report['faults_injected']}")
        for kind, count in report["faults_by_kind"].items():
            print(f"  {kind}: {count}")
        print(f"violations: {len(report['violations'])}")
        for line in report["violations"][:50]:
            print(f"  {line}")
        print(f"unexpected outcomes: {len(report['unexpected'])}")
        for line in report["unexpected"][:50]:
            print(f"  {line}")
        print(f"time: {report['seconds']} s")
    return 0 if not report["violations"] and not report["unexpected"] else 1


if __name__ == "__main__":
    sys.exit(main())
