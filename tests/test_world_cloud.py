"""The Globus cloud's stand-ins against the real clients that use them.

A private RabbitMQ (tests/world/broker.py), fauxbus as Globus Auth
(tests/world/auth_service.py) and the Compute web-service stand-in
(tests/world/compute_service.py) on loopback; real ``globus-compute-endpoint`` daemons
configured from the shipped endpoint configs (tests/world/endpoints.py); the real
Compute SDK Client and Executor behind scistream_prefect's GlobusComputeGateway block.
The SDK's ``local`` environment puts the web service at localhost:5000: run inside a
private network namespace (``/work/wt/netns-run``, or CI's), where that port is free.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from world import broker as world_broker
from world.auth_service import AuthService
from world.compute_service import ComputeService
from world.endpoints import EndpointDaemon, globus_env, register_functions

from scistream_prefect import (AuthError, GlobusComputeGateway, GlobusCredentials,
                               LocalGateway)
from scistream_prefect.compute import shutdown_executors
from scistream_proxy.leaks import proxy_pids

COMPUTE_PORT = 5000  # where GLOBUS_SDK_ENVIRONMENT=local puts the web service


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="world-cloud-"))
    os.chmod(path, 0o711)  # endpoint users traverse it to their own directories
    yield path
    leaked = proxy_pids(under=path)
    for pid in leaked:
        os.kill(pid, 9)
    shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"proxy processes left running: {leaked}"


@pytest.fixture(scope="module")
def cloud(workdir):
    """Broker, Auth and the Compute web service; Auth knows the service's own client,
    a facility's robot (owner of the endpoints), a stranger, and two users of the
    multi-user endpoint."""
    if not world_broker.available():
        pytest.skip("needs rabbitmq-server (Debian's package; scripts/with-test-env)")
    if not _port_free(COMPUTE_PORT):
        pytest.skip(f"localhost:{COMPUTE_PORT} is taken: run in a private network namespace")
    broker = world_broker.Broker().start()
    auth = compute = None
    try:
        auth = AuthService(["compute", "facility", "stranger", "user-a", "user-b"],
                           workdir=workdir)
        compute = ComputeService(broker, auth, port=COMPUTE_PORT, workdir=workdir)
        yield broker, auth, compute
    finally:
        shutdown_executors(wait=True)
        for part in (compute, auth):
            if part is not None:
                part.stop()
        broker.stop()


@pytest.fixture(scope="module")
def operator_user():
    """The Unix user the single-user endpoints run as: root would make them multi-user
    endpoints. Created for the module when running as root; else the current user."""
    if os.geteuid() != 0:
        yield None
        return
    name = f"sst-op-{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                    "/usr/sbin/nologin", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")]:
        os.chown(p, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="module")
def facility(cloud, workdir, operator_user):
    """Two gateways, each behind a real single-user endpoint daemon owned by the
    facility's robot; functions registered once. Yields name -> (daemon, gateway)."""
    _, auth, _ = cloud
    functions = workdir / "functions.json"
    register_functions(functions, globus_env(workdir / "admin-home", auth.url,
                                             auth.clients["facility"]))
    daemons, started = {}, []
    try:
        for name, ports in (("gw-p", (43000, 43039)), ("gw-c", (43100, 43139))):
            gateway = LocalGateway.create(name, workdir / name, port_range=ports)
            home = workdir / f"home-{name}"
            env = globus_env(home, auth.url, auth.clients["facility"])
            _chown_tree(workdir / name, operator_user)
            _chown_tree(home, operator_user)
            daemon = EndpointDaemon(name, home=home, env=env, functions=functions,
                                    settings=gateway.settings_path, user=operator_user)
            daemon.configure()
            started.append(daemon.start())
            daemons[name] = (daemon, gateway)
        yield daemons
    finally:
        shutdown_executors(wait=True)
        for daemon in started:
            daemon.stop()


@pytest.fixture
def as_facility(cloud, monkeypatch, tmp_path):
    """This process as a client of the world: Auth at the stand-in, the local Compute
    environment, the facility robot's credentials in a GlobusCredentials block."""
    from globus_compute_sdk import Executor

    _, auth, _ = cloud
    # Executors share a process-wide default task group, and with it one result
    # watcher; each test's are its own, and stop with its Executors.
    monkeypatch.setattr(Executor, "_default_task_group_id", None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GLOBUS_SDK_ENVIRONMENT", "local")
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", auth.url + "/")
    client_id, secret = auth.clients["facility"]
    GlobusCredentials(client_id=client_id, client_secret=secret).save("world-facility",
                                                                      overwrite=True)
    yield "world-facility"
    shutdown_executors(wait=True)


def _block(facility, name: str, credentials: str, **fields) -> GlobusComputeGateway:
    daemon, _ = facility[name]
    return GlobusComputeGateway.from_registration(
        daemon.endpoint_id, daemon.functions, display_name=name,
        credentials_block=credentials, **{"call_timeout_s": 120, **fields})


@pytest.mark.slow  # two endpoint daemons start (about a minute)
def test_reserve_status_release_through_a_real_endpoint_daemon(facility, as_facility):
    """The Executor submits the registered functions to the single-user endpoint over
    the real broker; the replies are the gateway's."""
    import hashlib

    gw = _block(facility, "gw-p", as_facility)
    info = gw.call("gateway_info", {})
    assert info["name"] == "gw-p" and info["active_streams"] == 0
    uid = str(uuid.uuid4())
    reply = gw.call("reserve", {"uid": uid, "role": "CONS", "num_conn": 2, "rate": 0,
                                "key_sha256": hashlib.sha256(b"hello-key").hexdigest()})
    try:
        assert reply["uid"] == uid and len(reply["listeners"]) == 2
        assert gw.call("status", {"uid": uid})["state"] == "RESERVED"
        assert gw.call("gateway_info", {})["active_streams"] == 1
    finally:
        assert gw.call("release", {"uid": uid})["released"] is True
    assert gw.call("gateway_info", {})["active_streams"] == 0


@pytest.mark.slow  # two endpoint daemons start (about a minute)
def test_a_stream_through_two_endpoint_daemons_carries_data(facility, as_facility,
                                                             producer_app):
    from conftest import run_consumer

    from scistream_prefect import open_stream, release_stream

    producer, consumer = _block(facility, "gw-p", as_facility), _block(facility, "gw-c",
                                                                       as_facility)
    app = producer_app(2, 8 << 20)
    handle = open_stream(producer, consumer, num_conn=2, app_listeners=app.listeners)
    try:
        code, received = run_consumer(handle.listeners)
        assert code == 0 and sum(r["bytes"] for r in received) == 8 << 20
        assert sorted(r["sha256"] for r in received) == sorted(
            r["sha256"] for r in app.result())
    finally:
        release_stream(producer, consumer, handle.uid)
    for gw in (producer, consumer):  # through the endpoints: their state is the operator's
        assert gw.call("gateway_info", {})["active_streams"] == 0


@pytest.mark.slow  # two endpoint daemons start (about a minute)
def test_a_wrong_token_is_refused(cloud, facility, as_facility):
    """A token Auth did not issue is a 401 at the web service; a client whose secret is
    wrong gets no token at all; another identity may not use a single-user endpoint."""
    from globus_sdk import AccessTokenAuthorizer, ComputeClientV2, GlobusAPIError

    bogus = ComputeClientV2(base_url=f"http://localhost:{COMPUTE_PORT}",
                            authorizer=AccessTokenAuthorizer("not-a-token"))
    with pytest.raises(GlobusAPIError) as refused:
        bogus.get_result_amqp_url()
    assert refused.value.http_status == 401

    _, auth, _ = cloud
    client_id, _ = auth.clients["facility"]
    GlobusCredentials(client_id=client_id, client_secret="wrong").save("world-wrong",
                                                                       overwrite=True)
    with pytest.raises(AuthError):
        _block(facility, "gw-p", "world-wrong").call("gateway_info", {})

    stranger_id, stranger_secret = auth.clients["stranger"]
    GlobusCredentials(client_id=stranger_id, client_secret=stranger_secret).save(
        "world-stranger", overwrite=True)
    with pytest.raises(AuthError, match="403"):
        _block(facility, "gw-p", "world-stranger").call("gateway_info", {})


@pytest.fixture
def consumer_stopped(facility, as_facility):
    """gw-c's endpoint daemon stopped for one test, then started again; what the
    calls queued meanwhile left on its gateway is released (they run on its return)."""
    daemon, _ = facility["gw-c"]
    daemon.stop()
    uids: list[str] = []
    yield uids
    daemon.start()
    gw = _block(facility, "gw-c", as_facility)
    deadline = time.monotonic() + 90
    while True:  # each call bounded by its call timeout, as is the loop (90 s)
        for uid in uids:  # a queued reserve may run beside the queued release
            gw.call("release", {"uid": uid})
        if gw.call("gateway_info", {})["active_streams"] == 0:
            break
        assert time.monotonic() < deadline, gw.call("list_streams", {})
        time.sleep(1)


@pytest.mark.slow  # two endpoint daemons start (about a minute)
def test_an_offline_endpoint_is_unavailable_and_the_open_releases_the_other_end(
        facility, as_facility, consumer_stopped):
    """With gw-c's daemon stopped, a call on it is UNAVAILABLE well within its 120 s
    call timeout (the service reports the endpoint offline), and opening a stream
    through it fails so, releasing the producer's reserved end; the offline end's
    release is tried once (the call waits at the service until the endpoint is back)."""
    from scistream_prefect import SciStreamError, open_stream
    from scistream_prefect.compute import EndpointOffline
    from scistream_prefect.streams_core import list_streams

    producer, consumer = _block(facility, "gw-p", as_facility), _block(facility, "gw-c",
                                                                       as_facility)
    assert consumer.call_timeout_s == 120
    started = time.monotonic()
    with pytest.raises(EndpointOffline) as offline:
        consumer.call("gateway_info", {})
    # Not a speed target: the old behaviour waited out the whole call timeout.
    assert time.monotonic() - started < consumer.call_timeout_s
    assert offline.value.code == "UNAVAILABLE" and "offline" in offline.value.message

    uid = str(uuid.uuid4())
    consumer_stopped.append(uid)
    # A handler of the run's logger's own sees each record once (caplog's, on the root,
    # sees them too when an earlier test turned propagation on: counted twice).
    records: list[logging.LogRecord] = []
    collect = logging.Handler()
    collect.emit = records.append
    run_log = logging.getLogger("prefect.flow_runs")
    run_log.addHandler(collect)
    try:
        with pytest.raises(SciStreamError) as failed:
            open_stream(producer, consumer, num_conn=1, app_listeners=["127.0.0.1:9"],
                        uid=uid)
    finally:
        run_log.removeHandler(collect)
    assert failed.value.code == "UNAVAILABLE", failed.value
    # Each try of a release writes one line to the run's log (teardown_stream).
    tries = [r.getMessage() for r in records
             if r.getMessage().startswith(f"release on {consumer.label}, stream {uid}:")]
    assert len(tries) == 1 and "UNAVAILABLE" in tries[0], tries
    assert producer.call("gateway_info", {})["active_streams"] == 0
    left = [s["state"] for s in list_streams(producer) if s["uid"] == uid]
    assert left in ([], ["RELEASED"]), left

    # A call still waiting at the offline endpoint: stopping the Executors gives up on
    # it after the bound (the SDK's own wait would last until the endpoint is back).
    consumer.submit("gateway_info", {})
    assert shutdown_executors(wait=True, timeout_s=2) is False


@pytest.mark.slow  # two endpoint daemons start (about a minute)
def test_a_command_on_an_offline_endpoint_answers_and_ends(facility, as_facility,
                                                           consumer_stopped):
    """``scistream list`` on a stopped endpoint prints UNAVAILABLE and its process ends:
    the Compute SDK's exit waits for the queued call's result, which comes only when the
    endpoint is back (the command hung there after its answer)."""
    from prefect.settings import PREFECT_API_URL

    _block(facility, "gw-c", as_facility).save("world-gw-c", overwrite=True)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "scistream_prefect.cli", "list", "--gateway", "world-gw-c"],
            capture_output=True, text=True, timeout=150, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as hung:
        printed = hung.stderr.decode(errors="replace") if hung.stderr else ""
        pytest.fail(f"the command did not end after printing:\n{printed}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("scistream list: UNAVAILABLE"), proc.stderr


def test_the_delay_knob_holds_every_request(cloud, workdir):
    """``delay_ms`` holds each request at least that long (a floor, not a speed), from
    the start and after a change at run time; ``refuse_status`` fails endpoint-status
    requests only; the service's environment carries nothing of the caller's."""
    broker, auth, _ = cloud
    (workdir / "slow").mkdir(exist_ok=True)
    slow = ComputeService(broker, auth, port=0, delay_ms=400, workdir=workdir / "slow")

    def held(path: str = "/v2/version") -> float:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"{slow.url}{path}", timeout=30) as reply:
                assert reply.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code
        return time.monotonic() - started

    try:
        assert all(held() >= 0.4 for _ in range(2))
        slow.configure(delay_ms=700, refuse_status=True)
        assert held() >= 0.7
        assert held(f"/v2/endpoints/{uuid.uuid4()}/status") == 503
        slow.configure()
        assert held(f"/v2/endpoints/{uuid.uuid4()}/status") == 401  # no token: checked
        environ = Path(f"/proc/{slow.process.proc.pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if b"netguard" in v or v.startswith(b"GLOBUS_")]
    finally:
        slow.stop()


@pytest.mark.slow  # two endpoint daemons start (about a minute)
def test_a_failed_status_request_only_loses_the_hint(cloud, facility, as_facility):
    """A call not answered within offline_check_s asks for the endpoint's status; when
    that request fails (the service answers 503), the call still waits for its result."""
    import hashlib

    _, _, compute = cloud
    gw = _block(facility, "gw-p", as_facility, offline_check_s=0.05)
    uid = str(uuid.uuid4())
    gw.call("reserve", {"uid": uid, "role": "CONS", "num_conn": 1, "rate": 0,
                        "key_sha256": hashlib.sha256(b"hello-key").hexdigest()})
    compute.configure(refuse_status=True)
    try:
        # wait_hello holds its worker 2 s (no hello comes): the status request is made.
        reply = gw.call("wait_hello", {"uid": uid, "timeout_s": 2})
        assert reply["uid"] == uid and reply["state"] == "RESERVED"
    finally:
        compute.configure()
        gw.call("release", {"uid": uid})


def test_an_offline_endpoint_is_not_retried_other_unavailable_is():
    """The read-only tasks' retry condition: an endpoint reported offline is final for
    this call, another UNAVAILABLE (a service hiccup) is retried."""
    from prefect.states import Failed

    from scistream_prefect import Unavailable
    from scistream_prefect.compute import EndpointOffline
    from scistream_prefect.tasks.streams import retry_if_transient

    assert not retry_if_transient(None, None, Failed(data=EndpointOffline("offline")))
    assert retry_if_transient(None, None, Failed(data=Unavailable("answered 502")))


def test_a_forward_carries_the_sdk_to_the_service(cloud, workdir):
    """What a namespace without the service uses for localhost:5000: the SDK's calls
    through world.forward reach the stand-in and come back."""
    from globus_sdk import AccessTokenAuthorizer, ComputeClientV2, GlobusAPIError

    from world.forward import Forward

    forward = Forward("127.0.0.1:0", f"127.0.0.1:{COMPUTE_PORT}",
                      log_path=workdir / "forward.log")
    try:
        port = forward.url.rsplit(":", 1)[1]
        client = ComputeClientV2(base_url=f"http://127.0.0.1:{port}",
                                 authorizer=AccessTokenAuthorizer("not-a-token"))
        assert client.get_version()["api"]
        with pytest.raises(GlobusAPIError) as refused:
            client.get_result_amqp_url()
        assert refused.value.http_status == 401
    finally:
        forward.stop()


@pytest.fixture(scope="module")
def mapped_users(workdir):
    """Two Unix users for the multi-user endpoint's identity mapping (root only), with
    homes (their user endpoints keep their files there)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates two Unix users and a multi-user endpoint")
    names = [f"sst-{who}-{uuid.uuid4().hex[:6]}" for who in ("ada", "bob")]
    for name in names:
        subprocess.run(["useradd", "--system", "--create-home", "--home-dir",
                        str(workdir / f"home-{name}"), "--shell", "/usr/sbin/nologin",
                        name], check=True)
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", name], check=False)


@pytest.mark.slow
@pytest.mark.root
def test_a_multi_user_endpoint_runs_each_identity_as_its_mapped_user(
        cloud, workdir, mapped_users, monkeypatch, tmp_path):
    """The manager endpoint (root) maps each Globus identity to its Unix user and starts
    that user's endpoint on the web service's start-user-endpoint command; the gateway
    functions run as that user, on that user's gateway settings and state."""
    import json

    from globus_compute_sdk import Executor

    from scistream_gateway.settings import GatewaySettings

    _, auth, _ = cloud
    identities = dict(zip(mapped_users, ("user-a", "user-b"), strict=True))
    root = workdir / "mu"
    root.mkdir(mode=0o711)
    settings_dir = root / "settings"
    settings_dir.mkdir(mode=0o711)
    for i, user in enumerate(mapped_users):
        entry = pwd.getpwnam(user)
        state = root / f"state-{user}"
        state.mkdir(mode=0o700)
        os.chown(state, entry.pw_uid, entry.pw_gid)
        toml = settings_dir / f"{user}.toml"
        toml.write_text(GatewaySettings(name=f"gw-{user}", state_dir=state,
                                        port_min=44000 + 100 * i,
                                        port_max=44039 + 100 * i).to_toml())
        os.chown(toml, entry.pw_uid, entry.pw_gid)
        os.chmod(toml, 0o600)
    mapping = root / "identity_mapping.json"
    mapping.write_text(json.dumps([{
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [{"source": "{username}",
                      "match": auth.clients[identities[user]][0]
                      + r"@clients\.auth\.globus\.org",
                      "output": user} for user in mapped_users]}]))
    daemon = None
    try:
        functions = root / "functions.json"
        admin_env = globus_env(root / "admin-home", auth.url, auth.clients["facility"])
        register_functions(functions, admin_env)
        daemon = EndpointDaemon("gw-mu", home=root / "admin-home", env=admin_env,
                                functions=functions, multi_user=True,
                                settings_dir=settings_dir, identity_mapping=mapping)
        daemon.configure()
        daemon.start()
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("GLOBUS_SDK_ENVIRONMENT", "local")
        monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", auth.url + "/")
        for user in mapped_users:
            # Executors share a process-wide task group, whose result watcher reads the
            # first identity's queue: each identity gets its own, as a process would.
            monkeypatch.setattr(Executor, "_default_task_group_id", None)
            client_id, secret = auth.clients[identities[user]]
            GlobusCredentials(client_id=client_id, client_secret=secret).save(
                f"world-{user}", overwrite=True)
            gw = GlobusComputeGateway.from_registration(
                daemon.endpoint_id, functions, credentials_block=f"world-{user}",
                call_timeout_s=180)
            uid = str(uuid.uuid4())
            reply = gw.call("reserve", {"uid": uid, "role": "CONS", "num_conn": 1,
                                        "rate": 0, "key_sha256": "0" * 64})
            try:
                assert gw.call("gateway_info", {})["name"] == f"gw-{user}"
                # The user's endpoint wrote the user's state, as that user.
                owners = {p.stat().st_uid for p in (root / f"state-{user}").rglob("*")}
                assert owners == {pwd.getpwnam(user).pw_uid}, (user, owners)
                assert reply["uid"] == uid
            finally:
                gw.call("release", {"uid": uid})
            shutdown_executors(wait=True)
    except Exception:
        if daemon is not None:
            print(daemon.log_tail(), daemon.user_endpoint_logs())
        raise
    finally:
        shutdown_executors(wait=True)
        if daemon is not None:
            daemon.stop()
