"""Globus Auth and the Globus Compute Executor, offline.

The Globus cloud is unreachable here, so its HTTP APIs are globus-sdk's own testing
fixtures (``globus_sdk.testing`` registered responses on top of ``responses``): every
request still goes through the real ``UserApp`` / ``ClientApp``, token storage and
validation, ID-token signature check, Compute ``Client`` and ``Executor``; only the
server side is canned. The Executor's results arrive over AMQP (pika); one test goes
all the way round: HTTP fixtures, globus-compute-endpoint's own ``execute_task`` running what
was submitted, and the Result delivered through a real RabbitMQ (``tests/world/broker.py``)
to the Executor's own result watcher. Stand-ins of the whole cloud, with real endpoint
daemons and streams through them, are tests/test_world_cloud.py's.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from pathlib import Path

import jwt
import pytest
import responses
from cryptography.hazmat.primitives.asymmetric import rsa
from globus_sdk.testing import RegisteredResponse, get_last_request

from scistream_prefect import AuthError, GlobusComputeGateway, GlobusCredentials, ServerError
from scistream_prefect import auth as scistream_auth
from scistream_prefect.compute import calls_given_up, shutdown_executors
from scistream_prefect.ownership import control_secret, with_proofs

ENDPOINT_ID = "6d3bd6a7-5b2e-47a8-a0b8-6e2e8a4ba2f0"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
IDENTITY = "ae341a98-d274-11e5-b888-dbae3a8ba545"


@pytest.fixture
def globus_offline(tmp_path, monkeypatch):
    """globus-sdk's registered responses active; tokens under a private HOME."""
    from globus_compute_sdk import Executor

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # Executors share a process-wide default task group, and with it one result watcher
    # (an AMQP connection); each test gets its own, so none hears another's broker.
    monkeypatch.setattr(Executor, "_default_task_group_id", None)
    for name in (scistream_auth.LOGIN_CLIENT_ID_ENV, "GLOBUS_COMPUTE_USER_DIR",
                 *(n for pair in scistream_auth.CLIENT_ENV_PAIRS for n in pair)):
        monkeypatch.delenv(name, raising=False)
    responses.start()
    try:
        yield
    finally:
        shutdown_executors()
        responses.stop()
        responses.reset()


def _signing_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _register_openid(key, client_id: str) -> str:
    """Globus Auth's OpenID configuration and JWK, and an ID token signed with that key."""
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    RegisteredResponse(service="auth", path="/.well-known/openid-configuration", json={
        "issuer": "https://auth.globus.org",
        "jwks_uri": "https://auth.globus.org/jwk.json",
        "id_token_signing_alg_values_supported": ["RS512"],
    }).add()
    RegisteredResponse(service="auth", path="/jwk.json", json={"keys": [public]}).add()
    now = int(time.time())
    return jwt.encode({"sub": IDENTITY, "aud": client_id, "iss": "https://auth.globus.org",
                       "iat": now, "exp": now + 3600, "preferred_username": "ada@example.org"},
                      key, algorithm="RS512")


def _client_grant(compute_token: str) -> dict:
    """A client credentials grant: one token, for the resource server asked for."""
    return {"access_token": compute_token, "expires_in": 172800, "token_type": "Bearer",
            "resource_server": "funcx_service", "scope": COMPUTE_SCOPE, "other_tokens": []}


def _token_grant(id_token: str | None, compute_token: str, refresh: bool) -> dict:
    auth = {"access_token": "auth-access-token", "expires_in": 172800, "token_type": "Bearer",
            "resource_server": "auth.globus.org", "scope": "openid profile email"}
    compute = {"access_token": compute_token, "expires_in": 172800, "token_type": "Bearer",
               "resource_server": "funcx_service", "scope": COMPUTE_SCOPE}
    if refresh:
        auth["refresh_token"], compute["refresh_token"] = "auth-refresh", "compute-refresh"
    if id_token:
        auth["id_token"] = id_token
    return {**auth, "other_tokens": [compute]}


def _form(request) -> dict:
    return dict(urllib.parse.parse_qsl(request.body if isinstance(request.body, str)
                                       else request.body.decode()))


def _token_requests() -> list:
    return [c.request for c in responses.calls if c.request.url.endswith("/v2/oauth2/token")]


def _register_login(client_id: str, compute_token: str = "compute-token-1") -> None:
    """Globus Auth's answers to a command-line login, and to one userinfo call."""
    id_token = _register_openid(_signing_key(), client_id)
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                       json=_token_grant(id_token, compute_token, refresh=True)).add()
    RegisteredResponse(service="auth", path="/v2/oauth2/userinfo", json={
        "sub": IDENTITY, "preferred_username": "ada@example.org", "name": "Ada",
        "email": "ada@example.org"}).add()


def test_login_stores_tokens_per_user_and_whoami_reads_them(globus_offline, tmp_path,
                                                            monkeypatch, capsys):
    _register_login(scistream_auth.DEFAULT_CLIENT_ID)
    # The command-line login flow: print the URL, read the code the user pastes.
    monkeypatch.setattr("builtins.input", lambda prompt="": "the-auth-code")
    monkeypatch.chdir(tmp_path)

    scistream_auth.login()

    grant = _form(_token_requests()[-1])
    assert grant["grant_type"] == "authorization_code" and grant["code"] == "the-auth-code"
    url = capsys.readouterr().out
    assert "auth.globus.org/v2/oauth2/authorize" in url
    assert f"client_id={scistream_auth.DEFAULT_CLIENT_ID}" in url
    # With the default client the tokens are the Globus Compute SDK's own store.
    path = scistream_auth.token_file()
    assert path == str(tmp_path / "home" / ".globus_compute" / "storage.db")
    import os
    import sqlite3
    import stat

    with sqlite3.connect(path) as db:
        assert "compute-token-1" in repr(db.execute("SELECT * FROM token_storage").fetchall())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # owner-only
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert not [p for p in tmp_path.iterdir() if p.name != "home"]  # nothing in the cwd

    assert scistream_auth.whoami()["preferred_username"] == "ada@example.org"
    assert get_last_request().headers["Authorization"] == "Bearer auth-access-token"


def test_one_login_serves_the_compute_sdk(globus_offline, monkeypatch):
    """After ``scistream login`` the Compute SDK's own default client (what
    ``scistream-gateway register`` and a notebook's ``Client()`` use) needs no login."""
    from globus_compute_sdk import Client

    _register_login(scistream_auth.DEFAULT_CLIENT_ID)
    monkeypatch.setattr("builtins.input", lambda prompt="": "the-auth-code")
    scistream_auth.login()

    def no_prompt(prompt=""):
        raise AssertionError("the Compute SDK asked for a second login")

    monkeypatch.setattr("builtins.input", no_prompt)
    RegisteredResponse(service="compute", path=f"/v2/endpoints/{ENDPOINT_ID}",
                       json={"uuid": ENDPOINT_ID, "name": "facility-p"}).add()
    client = Client(do_version_check=False)
    assert client.get_endpoint_metadata(ENDPOINT_ID)["name"] == "facility-p"
    assert get_last_request().headers["Authorization"] == "Bearer compute-token-1"
    assert len(_token_requests()) == 1  # the login's grant only


def test_a_registered_login_client_id(globus_offline, monkeypatch, capsys):
    """A facility's own native app: the consent screen names it, and its tokens are its
    own file (a refresh token works only for the client it was issued to)."""
    client_id = str(uuid.uuid4())
    monkeypatch.setenv(scistream_auth.LOGIN_CLIENT_ID_ENV, client_id)
    _register_login(client_id)
    monkeypatch.setattr("builtins.input", lambda prompt="": "the-auth-code")

    scistream_auth.login()

    assert f"client_id={client_id}" in capsys.readouterr().out
    path = Path(scistream_auth.token_file())
    assert path == Path.home() / ".globus" / "app" / client_id / "scistream" / "tokens.json"
    assert "compute-token-1" in path.read_text()
    assert not (Path.home() / ".globus_compute" / "storage.db").exists()
    assert scistream_auth.whoami()["sub"] == IDENTITY


def _login_storage():
    """The store ``scistream login`` writes with the default client (the Compute SDK's)."""
    from globus_sdk.token_storage import SQLiteTokenStorage

    return SQLiteTokenStorage(scistream_auth.token_file(), namespace="user/production")


def _store_expired_login() -> None:
    """What an old ``scistream login`` left: expired access tokens, valid refresh tokens."""
    from globus_sdk.token_storage import TokenStorageData

    storage = _login_storage()
    past = int(time.time()) - 60
    storage.store_token_data_by_resource_server({
        rs: TokenStorageData(resource_server=rs, identity_id=IDENTITY, scope=scope,
                             access_token="expired-" + rs, refresh_token=rs + "-refresh",
                             expires_at_seconds=past, token_type="Bearer")
        for rs, scope in (("auth.globus.org", "openid profile email"),
                          ("funcx_service", COMPUTE_SCOPE))
    })


def test_an_expired_token_is_refreshed_before_the_executor_submits(globus_offline):
    _store_expired_login()
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST", json={
        "access_token": "compute-token-2", "expires_in": 172800, "token_type": "Bearer",
        "resource_server": "funcx_service", "scope": COMPUTE_SCOPE,
        "refresh_token": "compute-refresh-2", "other_tokens": []}).add()
    function_id = str(uuid.uuid4())
    task_id = _register_submit(function_id)

    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID, display_name="facility-p",
                              function_ids={"status": function_id})
    future = gw.submit("status", {"uid": "0b5e4b56-4b5e-4b56-8b5e-0b5e4b564b56"})
    submit = _wait_for_submit(future)

    refresh = _form(_token_requests()[0])
    assert refresh["grant_type"] == "refresh_token"
    assert refresh["refresh_token"] == "funcx_service-refresh"
    assert submit.headers["Authorization"] == "Bearer compute-token-2"
    _bound_to_task(future, task_id)


def _register_submit(function_id: str) -> str:
    """The compute service's answers to one submission; returns the task's id."""
    task_id = str(uuid.uuid4())
    RegisteredResponse(service="compute", path=f"/v3/endpoints/{ENDPOINT_ID}/submit",
                       method="POST", json={
                           "request_id": str(uuid.uuid4()), "task_group_id": str(uuid.uuid4()),
                           "endpoint_id": ENDPOINT_ID,
                           "tasks": {function_id: [task_id]}}).add()
    # The result channel: an AMQP URL on loopback where nothing listens (offline).
    RegisteredResponse(service="compute", path="/v2/get_amqp_result_connection_url", json={
        "queue_prefix": "scistream-test", "connection_url": "amqp://guest:guest@127.0.0.1:9/"
    }).add()
    return task_id


def _bound_to_task(future, task_id: str, timeout: float = 30.0) -> None:
    """The Executor took the service's reply: the future is the submitted task's, and has
    no result (only the AMQP channel could bring one, and nothing listens there)."""
    deadline = time.monotonic() + timeout
    while future.task_id is None and not future.done():
        assert time.monotonic() < deadline, "the future never got its task id"
        time.sleep(0.05)
    assert future.task_id == task_id, (future.task_id, task_id)
    assert not future.done() or future.exception() is not None


def _wait_for_submit(future, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if future.done() and future.exception() is not None:
            raise AssertionError(f"submission failed: {future.exception()!r}")
        for call in responses.calls:
            if call.request.url.endswith("/submit"):
                return call.request
        time.sleep(0.05)
    urls = [c.request.url for c in responses.calls]
    raise AssertionError(f"the Executor never submitted: {urls}")


def test_a_confidential_client_block_drives_the_executor(globus_offline):
    """Headless: the GlobusCredentials block's client gets its tokens with its secret, and the
    Executor submits the registered function with the request as its argument."""
    from globus_compute_sdk.serialize import ComputeSerializer

    client_id = str(uuid.uuid4())
    GlobusCredentials(client_id=client_id, client_secret="s3cret-value").save(
        "robot", overwrite=True)
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                       json=_client_grant("robot-compute-token")).add()
    function_ids = {name: str(uuid.uuid4()) for name in ("reserve", "status", "release")}
    task_id = _register_submit(function_ids["status"])
    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID, function_ids=function_ids,
                              credentials_block="robot")
    request = {"uid": "0b5e4b56-4b5e-4b56-8b5e-0b5e4b564b56"}
    future = gw.submit("status", request)
    submit = _wait_for_submit(future)

    grant = _token_requests()[0]
    assert _form(grant)["grant_type"] == "client_credentials"
    assert grant.headers["Authorization"].startswith("Basic ")  # id:secret, HTTP basic
    assert submit.headers["Authorization"] == "Bearer robot-compute-token"
    body = json.loads(submit.body)
    (task,) = body["tasks"][function_ids["status"]]
    serializer = ComputeSerializer()
    buffers = serializer.unpack_buffers(task)
    # JSON data only (the shipped endpoint configs deserialize nothing else):
    assert all(b.startswith("11\n") for b in buffers), "arguments not serialized as JSONData"
    args, kwargs = (serializer.deserialize(b) for b in buffers)
    # The request as given, with the stream's control secret that submit added.
    assert list(args) == [with_proofs("status", request)] and kwargs == {}
    assert args[0]["control"] == control_secret(request["uid"])
    _bound_to_task(future, task_id)


def test_without_function_ids_the_shipped_function_is_registered_by_source(globus_offline):
    from globus_compute_sdk.serialize import ComputeSerializer

    from globus_compute_sdk.serialize import DillCodeSource

    from scistream_gateway import functions

    client_id = str(uuid.uuid4())
    GlobusCredentials(client_id=client_id, client_secret="x").save("robot2", overwrite=True)
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                       json=_client_grant("robot-token")).add()
    function_id = str(uuid.uuid4())
    RegisteredResponse(service="compute", path="/v3/functions", method="POST",
                       json={"function_uuid": function_id}).add()
    task_id = _register_submit(function_id)
    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID, credentials_block="robot2")
    future = gw.submit("gateway_info", {})
    _wait_for_submit(future)
    registration = next(json.loads(c.request.body) for c in responses.calls
                        if c.request.url.endswith("/v3/functions"))
    assert registration["function_name"] == "gateway_info"
    serializer = ComputeSerializer()
    (packed,) = serializer.unpack_buffers(registration["function_code"])
    shipped = serializer.deserialize(packed)
    # The function's source crossed the wire (not bytecode), and it is the shipped one.
    assert shipped.__doc__ == functions.gateway_info.__doc__
    assert packed.startswith(DillCodeSource.identifier)
    _bound_to_task(future, task_id)


def run_like_an_endpoint(settings_path: str, function_code: str, task_payload: str,
                         task_id: str, run_dir: str) -> bytes:
    """What an endpoint's worker does with a task: globus-compute-endpoint's own
    ``execute_task`` on the function the service registered and the arguments the SDK
    submitted, with the gateway's settings. Returns the packed Result message.

    Run it in its own process: ``execute_task`` changes the working directory.
    """
    import os

    from globus_compute_common.messagepack import pack
    from globus_compute_common.messagepack.message_types import Task
    from globus_compute_endpoint.engines.helper import execute_task

    from scistream_gateway.local_worker import ALLOWED_SERIALIZERS

    os.environ["SCISTREAM_GATEWAY_CONFIG"] = settings_path
    task = Task(task_id=uuid.UUID(task_id), task_buffer=function_code + task_payload)
    # As the shipped endpoint configs have it: source code and JSON data only.
    return execute_task(pack(task), uuid.UUID(task_id), run_dir=run_dir,
                        task_deserializers=list(ALLOWED_SERIALIZERS))


@pytest.mark.slow
def test_a_call_round_trips_through_the_executor_and_an_endpoint_engine(globus_offline,
                                                                        gateway_root):
    """The whole path with only the web service replaced: the Executor registers the
    shipped function and submits the request over HTTP (globus-sdk fixtures);
    globus-compute-endpoint's ``execute_task`` runs exactly what was sent against a real
    gateway; the Result goes through a real RabbitMQ (tests/world/broker.py) to the
    Executor's own result watcher; the block returns the gateway's reply."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import pika
    from conftest import make_gateway
    from world import broker as world_broker

    if not world_broker.available():
        pytest.skip("needs rabbitmq-server (Debian's package; scripts/with-test-env)")
    local = make_gateway(gateway_root, "behind-compute-gw")
    client_id = str(uuid.uuid4())
    GlobusCredentials(client_id=client_id, client_secret="x").save("robot-e2e", overwrite=True)
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                       json=_client_grant("robot-token")).add()
    function_id, task_id, task_group_id = (str(uuid.uuid4()) for _ in range(3))
    RegisteredResponse(service="compute", path="/v3/functions", method="POST",
                       json={"function_uuid": function_id}).add()
    RegisteredResponse(service="compute", path=f"/v3/endpoints/{ENDPOINT_ID}/submit",
                       method="POST", json={
                           "request_id": str(uuid.uuid4()), "task_group_id": task_group_id,
                           "endpoint_id": ENDPOINT_ID, "tasks": {function_id: [task_id]}}).add()
    with world_broker.Broker() as broker:
        # The service's part: the task group's result queue, and the URL to reach it.
        queue = f"scistream-test-{task_group_id}"
        admin = pika.BlockingConnection(pika.URLParameters(broker.url()))
        try:
            channel = admin.channel()
            channel.queue_declare(queue, durable=True)
            RegisteredResponse(service="compute", path="/v2/get_amqp_result_connection_url",
                               json={"queue_prefix": "scistream-test-",
                                     "connection_url": broker.url()}).add()
            # A result slower than offline_check_s asks for the endpoint's status.
            RegisteredResponse(service="compute", path=f"/v2/endpoints/{ENDPOINT_ID}/status",
                               json={"status": "online", "details": {}}).add()
            try:
                gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID, display_name="facility-x",
                                          credentials_block="robot-e2e")
                future = gw.submit("gateway_info", {})
                submit = _wait_for_submit(future)
                registration = next(json.loads(c.request.body) for c in responses.calls
                                    if c.request.url.endswith("/v3/functions"))
                (payload,) = json.loads(submit.body)["tasks"][function_id]
                with ProcessPoolExecutor(
                        1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    result = pool.submit(run_like_an_endpoint, str(local.settings_path),
                                         registration["function_code"], payload, task_id,
                                         str(gateway_root / "endpoint-run")).result(
                                             timeout=120)
                channel.basic_publish("", queue, result,
                                      pika.BasicProperties(delivery_mode=2))
                reply = gw.reply("gateway_info", future, timeout_s=60)
            finally:
                # The watcher hangs up; a message it had not acknowledged would be back.
                shutdown_executors(wait=True)
            left = channel.queue_declare(queue, passive=True).method.message_count
        finally:
            admin.close()
    assert reply["name"] == "behind-compute-gw"
    assert reply["active_streams"] == 0 and reply["free_ports"] == 40
    assert left == 0  # the Executor acknowledged the result message


def test_not_logged_in_is_an_auth_error_not_a_prompt(globus_offline, monkeypatch):
    def no_prompt(prompt=""):
        raise AssertionError("a flow must never wait on stdin for a login")

    monkeypatch.setattr("builtins.input", no_prompt)
    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID)
    with pytest.raises(AuthError, match="scistream login"):
        gw.call("gateway_info", {}, timeout_s=30)
    with pytest.raises(AuthError, match="scistream login"):
        scistream_auth.whoami()


def test_a_missing_credentials_block_is_an_auth_error(globus_offline):
    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID, credentials_block="no-such-block")
    with pytest.raises(AuthError, match="no-such-block"):
        gw.call("gateway_info", {})


def test_a_refused_submission_is_an_auth_error(globus_offline):
    client_id = str(uuid.uuid4())
    GlobusCredentials(client_id=client_id, client_secret="x").save("robot3", overwrite=True)
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                       json=_client_grant("robot-token")).add()
    RegisteredResponse(service="compute", path=f"/v3/endpoints/{ENDPOINT_ID}/submit",
                       method="POST", status=403, json={
                           "code": "FORBIDDEN", "error": "FORBIDDEN",
                           "reason": "not allowed on this endpoint"}).add()
    function_id = str(uuid.uuid4())
    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID, credentials_block="robot3",
                              function_ids={"status": function_id})
    request = {"uid": "0b5e4b56-4b5e-4b56-8b5e-0b5e4b564b56"}
    with pytest.raises(AuthError, match="403"):
        gw.call("status", request, timeout_s=30)
    # The refusal stopped that Executor for good; the next call gets a new one.
    responses.reset()
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                       json=_client_grant("robot-token")).add()
    task_id = _register_submit(function_id)
    future = gw.submit("status", request)
    _wait_for_submit(future)
    _bound_to_task(future, task_id)


def test_logout_revokes_and_deletes_the_tokens(globus_offline):
    _store_expired_login()
    RegisteredResponse(service="auth", path="/v2/oauth2/token/revoke", method="POST",
                       json={"active": False}).add()
    scistream_auth.logout()
    revoked = {_form(c.request)["token"] for c in responses.calls
               if c.request.url.endswith("/revoke")}
    assert {"funcx_service-refresh", "auth.globus.org-refresh"} <= revoked
    assert _login_storage().get_token_data_by_resource_server() == {}


def test_remote_failures_map_to_codes():
    """The replies a Compute future can carry, as the Executor's result watcher sets them."""
    from concurrent.futures import Future

    from globus_compute_sdk.errors import TaskExecutionFailed

    from scistream_prefect import NoResource

    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID)
    ok: Future = Future()
    ok.set_result({"uid": "u", "released": True})
    assert gw.reply("release", ok) == {"uid": "u", "released": True}
    refused: Future = Future()
    refused.set_result(NoResource("port range exhausted").to_wire())
    with pytest.raises(NoResource, match="exhausted"):
        gw.reply("reserve", refused)
    crashed: Future = Future()
    crashed.set_exception(TaskExecutionFailed("Traceback ...\nZeroDivisionError"))
    with pytest.raises(ServerError, match="failed on the endpoint"):
        gw.reply("status", crashed)


def test_an_offline_endpoint_is_unavailable_before_the_call_timeout(globus_offline):
    """A call unanswered after ``offline_check_s`` asks the service once for the
    endpoint's status, with the block's own token: offline is UNAVAILABLE at once;
    online waits out the timeout (TIMEOUT); an answered call asks nothing."""
    from concurrent.futures import Future

    from scistream_prefect import Timeout, Unavailable

    GlobusCredentials(client_id=str(uuid.uuid4()), client_secret="x").save(
        "robot-status", overwrite=True)
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST",
                       json=_client_grant("status-token")).add()
    status_path = f"/v2/endpoints/{ENDPOINT_ID}/status"
    RegisteredResponse(service="compute", path=status_path,
                       json={"status": "offline", "details": {}}).add()
    gw = GlobusComputeGateway(endpoint_id=ENDPOINT_ID, display_name="facility-p",
                              credentials_block="robot-status", call_timeout_s=120,
                              offline_check_s=0.2)

    def status_requests():
        return [c.request for c in responses.calls if c.request.url.endswith(status_path)]

    pending: Future = Future()
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"endpoint {ENDPOINT_ID} is offline"):
        gw.reply("reserve", pending)
    assert time.monotonic() - started < 60  # not the call timeout
    # Left for the SDK, not cancelled (its result watcher dies on a cancelled one), and
    # the process knows it gave up on a call (the CLI then exits without the SDK's wait).
    assert not pending.done() and calls_given_up()
    (asked,) = status_requests()
    assert asked.headers["Authorization"] == "Bearer status-token"

    responses.replace(responses.GET, asked.url, json={"status": "online", "details": {}})
    with pytest.raises(Timeout, match="did not finish in 0.5 s"):
        gw.reply("reserve", Future(), timeout_s=0.5)
    assert len(status_requests()) == 2

    answered: Future = Future()
    answered.set_result({"uid": "u", "released": True})
    assert gw.reply("release", answered)["released"] is True
    assert len(status_requests()) == 2  # no status request for a call that answered


def test_block_fields_are_checked():
    with pytest.raises(ValueError, match="unknown gateway functions"):
        GlobusComputeGateway(endpoint_id=ENDPOINT_ID, function_ids={"rm_rf": str(uuid.uuid4())})
    with pytest.raises(ValueError):
        GlobusComputeGateway(endpoint_id="not-a-uuid")
    creds = GlobusCredentials(client_id=str(uuid.uuid4()), client_secret="hush")
    assert "hush" not in repr(creds) and "hush" not in str(creds.model_dump())


def test_whoami_as_a_confidential_client_from_the_environment(globus_offline, monkeypatch):
    client_id = str(uuid.uuid4())
    monkeypatch.setenv("SCISTREAM_GLOBUS_CLIENT_ID", client_id)
    monkeypatch.setenv("SCISTREAM_GLOBUS_CLIENT_SECRET", "env-secret")
    RegisteredResponse(service="auth", path="/v2/oauth2/token", method="POST", json={
        "access_token": "client-auth-token", "expires_in": 172800, "token_type": "Bearer",
        "resource_server": "auth.globus.org", "scope": "openid profile email",
        "other_tokens": []}).add()
    RegisteredResponse(service="auth", path="/v2/oauth2/userinfo", json={
        "sub": client_id, "preferred_username": f"{client_id}@clients.auth.globus.org",
        "name": "facility robot", "email": None}).add()
    who = scistream_auth.whoami()
    assert who["sub"] == client_id and who["name"] == "facility robot"
    grant = _token_requests()[0]
    assert _form(grant)["grant_type"] == "client_credentials"
    assert get_last_request().headers["Authorization"] == "Bearer client-auth-token"
    # Nothing was written for a client: its tokens live in memory only.
    assert not (Path.home() / ".globus").exists()


@pytest.mark.parametrize("name", ["SCISTREAM_GLOBUS_CLIENT_SECRET", "SCISTREAM_GLOBUS_CLIENT_ID",
                                  "GLOBUS_COMPUTE_CLIENT_SECRET"])
def test_half_a_client_in_the_environment_is_an_auth_error(globus_offline, monkeypatch, name):
    monkeypatch.setenv(name, "orphan-value")
    with pytest.raises(AuthError, match="only one of") as refused:
        scistream_auth.make_app()
    assert "orphan-value" not in str(refused.value)


def test_compute_sdk_native_client_id_is_the_login_default(globus_offline, monkeypatch):
    """GLOBUS_COMPUTE_CLIENT_ID without a secret is the Compute SDK's native client: the
    login follows it, so both still share one store; ours overrides it."""
    other = str(uuid.uuid4())
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", other)
    assert scistream_auth.make_app().client_id == other
    assert scistream_auth.token_file().endswith("storage.db")
    mine = str(uuid.uuid4())
    monkeypatch.setenv(scistream_auth.LOGIN_CLIENT_ID_ENV, mine)
    assert scistream_auth.make_app().client_id == mine
    assert scistream_auth.token_file().endswith(f"{mine}/scistream/tokens.json")


def test_function_ids_from_the_registration_file(tmp_path):
    from scistream_gateway.functions import ALL

    from scistream_prefect import BadFormat

    ids = {name: str(uuid.uuid4()) for name in ALL}
    path = tmp_path / "functions.json"
    path.write_text(json.dumps(ids))
    gw = GlobusComputeGateway.from_registration(ENDPOINT_ID, path, display_name="facility-p")
    assert {k: str(v) for k, v in gw.function_ids.items()} == ids
    assert gw.label == "compute:facility-p"
    path.write_text(json.dumps({**ids, "format_disk": str(uuid.uuid4())}))
    with pytest.raises(BadFormat, match="unknown gateway functions"):
        GlobusComputeGateway.from_registration(ENDPOINT_ID, path)
    path.write_text("[1, 2]")
    with pytest.raises(BadFormat, match="not an object"):
        GlobusComputeGateway.from_registration(ENDPOINT_ID, path)
    with pytest.raises(BadFormat, match="cannot read"):
        GlobusComputeGateway.from_registration(ENDPOINT_ID, tmp_path / "missing.json")


def test_the_blocks_carry_a_logo_and_a_documentation_url():
    """What the Prefect UI's block catalog shows next to each block."""
    from scistream_prefect import LocalGateway

    for block in (LocalGateway, GlobusComputeGateway, GlobusCredentials):
        block_type = block._to_block_type()
        assert str(block_type.logo_url).startswith("https://"), block
        assert str(block_type.documentation_url).startswith("https://"), block
