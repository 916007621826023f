"""The two-facility world (tests/world/): its network holds what docs/federation.md says,
and a stream crosses it end to end.

The world is built once per module; every probe is a real process in a namespace."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from world import netns
from world.netns import (
    APP_P,
    C_LAN,
    C_WAN,
    C_WAN6,
    CLOUD,
    P_LAN,
    P_PUBLIC,
    P_WAN,
    P_WAN6,
    World,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the world needs root (namespaces, users)"),
    pytest.mark.skipif(not (shutil.which("nft") and shutil.which("ip")),
                       reason="the world needs iproute2 and nftables (apt-get install them)"),
]

# Listens on argv[1], prints its port, and tells every client the address it came from.
LISTENER = """
import socket, sys
host = sys.argv[1]
server = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host
                              else socket.AF_INET)
print(server.getsockname()[1], flush=True)
while True:
    conn, peer = server.accept()
    with conn:
        conn.sendall(peer[0].encode())
"""
# Connects to each "host port" argument; prints, per target, the address the listener
# saw, or the error.
PROBE = """
import json, socket, sys
out = []
for target in sys.argv[1:]:
    host, port = target.rsplit(" ", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            out.append(sock.recv(100).decode())
    except OSError as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def world():
    with World() as built:
        yield built
    assert built.left() == {}


class Listener:
    def __init__(self, world: World, ns: str, host: str):
        self.proc = world.popen(ns, [sys.executable, "-c", LISTENER, host],
                                stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def listen(world):
    started: list[Listener] = []

    def start(ns: str, host: str) -> int:
        started.append(Listener(world, ns, host))
        return started[-1].port

    yield start
    for listener in started:
        listener.close()


def probe(world: World, ns: str, *targets: tuple[str, int]) -> list[str]:
    """What each connection from ``ns`` got: the address its listener saw, or an error."""
    done = world.run(ns, [sys.executable, "-c", PROBE, *(f"{h} {p}" for h, p in targets)],
                     capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_the_world_builds_and_tears_down_leaving_nothing():
    with World() as other:
        assert set(netns._existing()) >= {other.name(ns) for ns in netns.NAMESPACES}
        sleeper = other.popen("cloud", ["sleep", "600"])
        Listener(other, "fac-p", P_LAN)  # killed by the teardown, not by the test
        left = other.left()
        assert left["processes"] and left["listening"][other.name("fac-p")]
    assert sleeper.wait(timeout=30) < 0
    assert other.left() == {}
    assert not [n for n in netns._existing() if n.startswith(f"ssw{other.token}-")]


def test_an_app_is_reached_only_from_its_own_gateway(world, listen):
    port = listen("app-p", APP_P)  # the producer app on facility P's LAN
    assert probe(world, "fac-p", (APP_P, port)) == [P_LAN]
    for ns in ("fac-c", "app-c", "wan", "cloud", "user"):
        assert probe(world, ns, (APP_P, port)) == ["OSError"], ns  # no route: ENETUNREACH


def test_an_app_reaches_only_its_own_gateways_lan_address(world, listen):
    on_lan, on_wan = listen("fac-p", P_LAN), listen("fac-p", P_WAN)
    cloud = listen("cloud", CLOUD)
    peer = listen("fac-c", C_LAN)
    assert probe(world, "app-p", (P_LAN, on_lan), (P_WAN, on_wan), (CLOUD, cloud),
                 (C_LAN, peer)) == [APP_P, "OSError", "OSError", "OSError"]


def test_the_gateways_meet_over_the_wan_with_p_behind_nat(world, listen):
    at_p, at_p6 = listen("fac-p", P_WAN), listen("fac-p", P_WAN6)
    at_c = listen("fac-c", C_WAN)
    # C dials P's public address; P sees C as it is. P dials out from its public address.
    assert probe(world, "fac-c", (P_PUBLIC, at_p), (P_WAN6, at_p6)) == [C_WAN, C_WAN6]
    assert probe(world, "fac-p", (C_WAN, at_c)) == [P_PUBLIC]
    # P's private address is reached only through the NAT: without a route C cannot try,
    # and the router drops a connection that the NAT did not rewrite.
    assert probe(world, "fac-c", (P_WAN, at_p)) == ["OSError"]
    world.run("fac-c", ["ip", "route", "add", f"{P_WAN}/32", "via", netns.C_ROUTER], check=True)
    try:
        assert probe(world, "fac-c", (P_WAN, at_p)) == ["TimeoutError"]
    finally:
        world.run("fac-c", ["ip", "route", "del", f"{P_WAN}/32"], check=True)


def test_the_cloud_is_the_control_plane_and_joins_no_two_facilities(world, listen):
    cloud = listen("cloud", CLOUD)
    for ns, seen in (("fac-p", "198.51.100.2"), ("fac-c", "198.51.100.6"),
                     ("user", "198.51.100.10")):
        assert probe(world, ns, (CLOUD, cloud)) == [seen], ns
    c_control = listen("fac-c", "198.51.100.6")
    assert probe(world, "fac-p", ("198.51.100.6", c_control)) == ["OSError"]
    assert probe(world, "user", (P_LAN, listen("fac-p", P_LAN)), (C_WAN, listen("fac-c", C_WAN))
                 ) == ["OSError", "OSError"]


def test_nothing_routes_out(world):
    names = {world.name(ns) for ns in netns.NAMESPACES}
    for ns in netns.NAMESPACES:
        assert world.run(ns, ["ip", "route", "show", "default"], capture_output=True,
                         text=True).stdout == "", ns
        for family, address in (("-4", "1.1.1.1"), ("-6", "2606:4700:4700::1111")):
            done = world.run(ns, ["ip", family, "route", "get", address],
                             capture_output=True, text=True)
            assert done.returncode != 0 and "unreachable" in done.stderr, (ns, done)
        # Every link but loopback is a veth whose other end is in the world.
        ids = {entry["nsid"]: entry["name"] for entry in json.loads(world.run(
            ns, ["ip", "-j", "netns", "list-id"], capture_output=True, text=True,
            check=True).stdout)}
        links = json.loads(world.run(ns, ["ip", "-j", "-d", "link"], capture_output=True,
                                     text=True, check=True).stdout)
        for link in links:
            if link["ifname"] != "lo":
                assert link["linkinfo"]["info_kind"] == "veth", (ns, link)
                assert ids.get(link.get("link_netnsid")) in names, (ns, link)


# -- Prefect in the world ------------------------------------------------------------

WORKERS_AND_DEPLOYMENTS = """
import json, time
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    deadline = time.monotonic() + 120
    while True:
        workers = client.read_workers_for_work_pool("scistream")
        if any(w.status == "ONLINE" for w in workers) or time.monotonic() > deadline:
            break
        time.sleep(1)
    entrypoints = [d.entrypoint for d in [
        client.read_deployment_by_name("open-stream/scistream"),
        client.read_deployment_by_name("release-stream/scistream")]]
print(json.dumps({"workers": [str(w.status) for w in workers], "entrypoints": entrypoints}))
"""


@pytest.fixture(scope="module")
def federation():
    """The whole world, once for the module: stand-ins, broker, endpoints, Prefect."""
    from world import broker
    from world.federation import Federation

    if not broker.available():
        pytest.skip("rabbitmq-server is not installed (scripts/with-test-env installs it)")
    # Not under pytest's base directory (0700): the gateway nodes' Unix users reach
    # their homes in here.
    root = Path(tempfile.mkdtemp(prefix="scistream-federation-"))
    fed = Federation(root)
    try:
        fed.start()
        yield fed
    finally:
        left = fed.stop()
    assert left == {}
    # Both nodes' Unix users (C's two mapped users) are gone with the world.
    unix_users = [user.unix for node in fed.nodes.values() for user in node.users.values()]
    assert len(unix_users) == 3
    assert not [u for u in unix_users if u in {entry.pw_name for entry in pwd.getpwall()}]
    shutil.rmtree(root)


def test_prefect_runs_in_the_world_from_an_installed_package(federation):
    from world.prefect_world import installed_origin

    prefect = federation.prefect
    assert installed_origin(prefect).startswith(str(prefect.root / "venv"))
    seen = prefect.python(WORKERS_AND_DEPLOYMENTS)
    assert "ONLINE" in " ".join(seen["workers"]), (seen, prefect.worker.tail())
    assert set(seen["entrypoints"]) == {
        "scistream_prefect.flows.streams.open_stream",
        "scistream_prefect.flows.streams.release_stream"}
    assert "Worker 'ProcessWorker" in prefect.worker.tail()


def _end_to_end(federation, nbytes: int, **kwargs) -> dict:
    from world.federation import stream_end_to_end

    summary = stream_end_to_end(federation, nbytes, num_conn=4, **kwargs)
    assert summary["checksum_ok"] and summary["bytes"] == nbytes, summary
    assert summary["tls"], summary
    # reserve ‖ reserve -> connect ‖ connect: the flow sends the hello with P's connect.
    assert summary["setup_round_trips"] == 2, summary
    assert summary["left"] == {}, summary
    return summary


def test_a_deployment_run_streams_through_both_endpoints(federation):
    summary = _end_to_end(federation, 64 << 20)
    # P is behind NAT: it advertised the address C reaches, not the one it binds.
    assert all(a.startswith(f"{P_PUBLIC}:") for a in summary["wan_listeners"]), summary


def test_a_run_over_ipv6_between_the_gateways(federation):
    p, c = federation.nodes["P"], federation.nodes["C"]
    p.write_settings(wan_address=P_WAN6, wan_advertise_address=P_WAN6)
    c.write_settings(wan_address=C_WAN6)
    try:
        summary = _end_to_end(federation, 16 << 20)
    finally:
        p.write_settings()
        c.write_settings()
    assert all(a.startswith(f"[{P_WAN6}]:") for a in summary["wan_listeners"]), summary


def _row(user, uid: str) -> dict:
    """Stream ``uid``'s row in ``user``'s gateway state (read as root)."""
    with sqlite3.connect(user.state_dir / "state.sqlite3") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM streams WHERE uid = ?", (uid,)).fetchone()
    return dict(row) if row else {}


def _cat(unix_user: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", unix_user, "--", "cat", str(path)],
                          capture_output=True)


def test_a_second_user_of_gateway_c_cannot_see_connect_or_release_the_firsts_stream(
        federation):
    """C's multi-user endpoint maps ``pipeline`` and ``other`` to two Unix users. With
    the pipeline's stream open, ``other`` calls C from user, even with the same client
    key (its requests carry the very control secret and owner token of that stream):
    its calls run as its own Unix user on its own gateway state, where no such stream
    is. The pipeline's stream stays as it was, and the other Unix user cannot read the
    first one's state, keys or settings."""
    from world.federation import calls, run_deployment

    p, c = federation.nodes["P"], federation.nodes["C"]
    mine, theirs = c.users["pipeline"], c.users["other"]
    assert mine.unix != theirs.unix
    uid = str(uuid.uuid4())
    opened = run_deployment(federation, "open-stream/scistream", {
        "producer": p.block(), "consumer": c.block(), "num_conn": 2,
        "app_listeners": [f"{APP_P}:9"], "uid": uid, "tls": True})
    try:
        assert opened["state"] == "COMPLETED", (opened, federation.prefect.worker.tail())
        row = _row(mine, uid)
        (before,) = calls(federation, c, [("status", {"uid": uid})])
        assert before["alive"] and before["state"] == "CONNECTED", before
        # The connect the flow made on C, replayed: P's listeners and certificate.
        peer = _row(p.users["pipeline"], uid)
        connect = {"uid": uid, "tls": True,
                   "remote_listeners": json.loads(peer["listeners"]),
                   "peer_fingerprint": peer["cert_fingerprint"],
                   "peer_certificate": peer["certificate"]}
        status, listed, connected, released, info = calls(federation, c, [
            ("status", {"uid": uid}), ("list_streams", {}), ("connect", connect),
            ("release", {"uid": uid}), ("gateway_info", {})], identity="other")
        assert status.get("error", {}).get("code") == "INVALID_UID", status
        assert uid not in [s["uid"] for s in listed["streams"]], listed
        assert connected.get("error", {}).get("code") == "INVALID_UID", connected
        # release is idempotent: a uid that the caller's gateway does not hold is
        # released already there. It touched nothing of the pipeline's (below).
        assert released == {"uid": uid, "released": True}, released
        assert (info["name"], info["active_streams"]) == (theirs.gateway_name, 0), info
        (after,) = calls(federation, c, [("status", {"uid": uid})])
        assert after == before  # the same state, relay (pid, alive), lease, counters
        assert _row(mine, uid) == row
        stream_files = [f for f in (mine.state_dir / "streams" / uid).iterdir() if f.is_file()]
        assert stream_files
        for path in (mine.state_dir / "state.sqlite3", *stream_files, mine.settings_path):
            assert _cat(theirs.unix, path).returncode != 0, path
            assert _cat(mine.unix, path).returncode == 0, path
    finally:
        released_run = run_deployment(federation, "release-stream/scistream", {
            "producer": p.block(), "consumer": c.block(), "uid": uid})
    assert released_run["state"] == "COMPLETED", released_run
    assert p.left() == {} and c.left() == {}


def test_an_offline_endpoint_is_unavailable_and_the_open_releases_the_other_end(
        federation):
    """C's endpoint daemon stopped: an open run from user ends UNAVAILABLE (after
    offline_check_s the client asks the web service, which has C's last heartbeat; it
    does not wait out its call timeout, which would be TIMEOUT) and releases P's end.
    Started again, C runs the calls queued for it meanwhile, whose stream is released;
    the next test's stream goes through the restarted endpoint."""
    from deploykit import wait_for
    from world.federation import calls, run_deployment

    p, c = federation.nodes["P"], federation.nodes["C"]
    uid = str(uuid.uuid4())
    c.endpoint.stop()
    try:
        out = run_deployment(federation, "open-stream/scistream", {
            "producer": p.block(), "consumer": c.block(), "num_conn": 2,
            "app_listeners": [f"{APP_P}:9"], "uid": uid, "tls": True})
        assert out["state"] == "FAILED" and "UNAVAILABLE" in out["message"], out
        assert p.left() == {}
    finally:
        c.endpoint.start()

    def released_on_c() -> bool:
        # The queued reserve and releases run in any order: release until none is left
        # (a reserve in progress makes the release UNAVAILABLE: tried again).
        calls(federation, c, [("release", {"uid": uid})])
        return not c.left()

    wait_for(released_on_c, "the stream of the calls queued on C released", timeout=300,
             every=2)


def test_an_endpoint_restarted_while_the_stream_flows(federation):
    """The relays outlive the endpoint: C's endpoint stops and starts while 16 MiB flow at
    8 Mbit/s (16 s); the data keeps flowing, and the release run's calls, the first
    after the restart, reconcile."""
    restarts = []

    def restart_c():
        endpoint = federation.nodes["C"].endpoint
        endpoint.restart()
        restarts.append(endpoint.proc.pid)

    _end_to_end(federation, 16 << 20, rate=8000, during=restart_c)
    assert restarts


@pytest.mark.slow
def test_one_gib_through_both_endpoints(federation):
    _end_to_end(federation, 1 << 30)


# An external controller's run: the hello key in a Secret block, no app listeners, so
# the run waits for the producer's controller's hello, which never comes.
CANCEL_WHILE_WAITING = """
import json, secrets, sys, time
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.states import Cancelling
Secret(value=secrets.token_urlsafe(24)).save("world-hello-key", overwrite=True)
parameters = dict(json.loads(sys.argv[1]), hello_key_block="world-hello-key")
run = run_deployment("open-stream/scistream", parameters=parameters, timeout=0)
this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
with get_client(sync_client=True) as client:
    deadline = time.monotonic() + 600
    while not any(t.name.startswith("wait-hello") and t.state and t.state.is_running()
                  for t in client.read_task_runs(flow_run_filter=this_run)):
        state = client.read_flow_run(run.id).state
        if time.monotonic() > deadline or state.is_final():
            sys.exit(f"the run never waited for a hello: {state}")
        time.sleep(1)
    client.set_flow_run_state(run.id, Cancelling(), force=True)
    while not (state := client.read_flow_run(run.id).state).is_final():
        time.sleep(1)
print(json.dumps({"state": state.type.value}))
"""


def test_a_run_cancelled_while_it_waits_for_a_hello_releases_both_ends(federation):
    from deploykit import wait_for

    p, c = federation.nodes["P"], federation.nodes["C"]
    parameters = {"producer": p.block(), "consumer": c.block(), "num_conn": 2,
                  "uid": str(uuid.uuid4()), "hello_timeout_s": 600}
    seen = federation.prefect.python(CANCEL_WHILE_WAITING, json.dumps(parameters))
    assert seen["state"] == "CANCELLED", (seen, federation.prefect.worker.tail())
    wait_for(lambda: not p.left() and not c.left(), "both ends released", timeout=300,
             every=2)
