"""Property-based tests of the gateway functions' inputs (hypothesis): no input makes a
function raise (every reply is a JSON object; failures carry a known SciStream code and
never SERVER_ERR), and no refused input changes state (the SQLite tables and the
stream directories are compared byte for byte before and after)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scistream_gateway import functions
from scistream_gateway.errors import ERROR_CODES
from scistream_gateway.service import Gateway
from scistream_gateway.settings import CONFIG_ENV, GatewaySettings
from scistream_prefect.ownership import control_secret, owner_token, sha256_hex, with_proofs
from scistream_proxy.leaks import proxy_pids

from badinputkit import APP, KEY, dump_state

pytestmark = pytest.mark.slow

def _call(name: str, request: dict) -> dict:
    """Gateway function ``name`` with this client's proofs of ownership added."""
    return functions.ALL[name](with_proofs(name, request))


def _release(settings: GatewaySettings, uid: str) -> None:
    """Release ``uid`` as the operator: a fuzzed reserve may have recorded a control
    secret nobody knows."""
    with Gateway(settings) as gateway:
        gateway.operator_release(uid)


class World:
    """One gateway with one stream in HELLO state (so wait_hello never blocks)."""

    def __init__(self, root: Path, port_base: int):
        self.settings = GatewaySettings(name="prop-gw", state_dir=root / "state",
                                        port_min=port_base, port_max=port_base + 15,
                                        max_num_conn=8, rate_capacity=50_000)
        self.path = root / "gateway.toml"
        self.path.write_text(self.settings.to_toml())
        self.uid = ""
        self.reply: dict = {}

    def ensure_stream(self) -> None:
        status = _call("status", {"uid": self.uid}) if self.uid else {"error": 1}
        if "error" not in status and status["state"] == "HELLO":
            return
        if self.uid:
            _call("release", {"uid": self.uid})
        self.uid = str(uuid.uuid4())
        self.reply = _call("reserve", {
            "uid": self.uid, "role": "PROD", "num_conn": 2, "rate": 1000, "lease_s": 3600,
            "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()})
        assert "error" not in self.reply, self.reply
        hello = functions.hello({"uid": self.uid, "key": KEY, "role": "PROD",
                                 "app_listeners": [APP]})
        assert "error" not in hello, hello


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("properties")
    w = World(root, 30000)
    mp = pytest.MonkeyPatch()
    mp.setenv(CONFIG_ENV, str(w.path))
    w.ensure_stream()
    yield w
    for stream_uid in _active_uids(w.settings.state_dir):
        _release(w.settings, stream_uid)
    mp.undo()
    assert proxy_pids(under=root) == []


def _active_uids(state_dir: Path) -> list[str]:
    with sqlite3.connect(state_dir / "state.sqlite3") as db:
        return [r[0] for r in db.execute(
            "SELECT uid FROM streams WHERE state IN ('RESERVED','HELLO','CONNECTED','FAILED')")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
addresses = st.sampled_from([
    APP, "127.0.0.1:0", "127.0.0.1:65536", "evil\nhost:80", "host name:80", "::1:80",
    "[::1]:80", "[127.0.0.1]:80", "localhost:22", "a" * 300 + ":1", "x:1;rm -rf /",
    "127.0.0.1:80\n[global]", "", ":80",
]) | st.text(max_size=30)


def field_strategies(world: World) -> dict:
    cert = world.reply.get("certificate", "")
    fields_key = st.sampled_from([KEY, KEY + " ", ""]) | json_values
    app_lists = st.lists(addresses, max_size=4) | json_values
    fingerprint = world.reply.get("cert_fingerprint", "0" * 64)
    return {
        "uid": st.sampled_from([world.uid, world.uid.upper(), world.uid.replace("-", ""),
                                "not-a-uid", " " + world.uid])
               | st.uuids().map(str) | json_values,
        "role": st.sampled_from(["PROD", "CONS", "prod", "BOTH", ""]) | json_values,
        "num_conn": st.integers(-3, 70) | json_values,
        "rate": st.integers(-10, 10**10) | json_values,
        "key_sha256": st.sampled_from(["0" * 64, "0" * 63, "G" * 64, "A" * 64]) | json_values,
        "control_sha256": st.sampled_from(["0" * 64, "0" * 63, "G" * 64]) | json_values,
        "owner_sha256": st.sampled_from(["0" * 64, "A" * 64]) | json_values,
        "control": st.sampled_from([control_secret(world.uid), "wrong", ""]) | json_values,
        "owner": st.sampled_from([owner_token(), ""]) | json_values,
        "key": fields_key,
        "lease_s": st.integers(-5, 10**6) | st.floats(-1, 10) | json_values,
        "timeout_s": st.floats(-1, 0.02) | st.sampled_from([21, 3600, True]) | json_values,
        "app_listeners": app_lists,
        "remote_listeners": st.lists(addresses, max_size=70) | json_values,
        "peer_fingerprint": st.sampled_from([fingerprint, "0" * 64]) | json_values,
        "peer_certificate": st.sampled_from([cert, cert.replace("A", "B", 1), "PEM"])
                            | json_values,
        "tls": st.booleans() | json_values,
        "hello": st.fixed_dictionaries({"key": fields_key, "app_listeners": app_lists})
                 | st.sampled_from([{"key": KEY}, {"key": KEY, "app_listeners": [APP],
                                                    "role": "PROD"}]) | json_values,
        "unknown": json_values,
        "__class__": json_values,
    }


def valid_requests(world: World, fresh_uid: str) -> dict[str, dict]:
    """A valid request for each function, about the world's stream where it takes one."""
    control = control_secret(world.uid)
    return {
        "gateway_info": {},
        "reserve": {"uid": fresh_uid, "role": "CONS", "num_conn": 1, "rate": 1000,
                    "lease_s": 60, "key_sha256": "0" * 64,
                    "control_sha256": sha256_hex(control_secret(fresh_uid)),
                    "owner_sha256": sha256_hex(owner_token())},
        "hello": {"uid": world.uid, "key": KEY, "role": "PROD", "app_listeners": [APP]},
        "wait_hello": {"uid": world.uid, "control": control, "timeout_s": 0},
        "connect": {"uid": world.uid, "control": control, "remote_listeners": ["127.0.0.1:9"],
                    "peer_fingerprint": world.reply["cert_fingerprint"],
                    "peer_certificate": world.reply["certificate"],
                    "hello": {"key": KEY, "app_listeners": [APP]}},
        "status": {"uid": world.uid, "control": control},
        "renew": {"uid": world.uid, "control": control, "lease_s": 3600},
        "release": {"uid": world.uid, "control": control},
        "list_streams": {"owner": owner_token()},
    }


@st.composite
def requests(draw, world: World, name: str):
    """Mostly a valid request with a few fields dropped, replaced or added (so the
    deep checks are reached), sometimes anything at all."""
    fields = field_strategies(world)
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not even an object
    fresh_uid = str(draw(st.uuids(version=4)))
    request = dict(valid_requests(world, fresh_uid)[name])
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "replace", "replace", "add"]))
        if op == "drop" and request:
            del request[draw(st.sampled_from(sorted(request)))]
        elif op == "replace" and request:
            key = draw(st.sampled_from(sorted(request)))
            request[key] = draw(fields[key])
        else:
            key = draw(st.sampled_from(sorted(fields)))
            request[key] = draw(fields[key])
    return request


def _is_valid_reply(reply: object) -> bool:
    try:
        json.dumps(reply, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return isinstance(reply, dict)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_input_raises_and_no_refused_input_changes_state(world, data):
    world.ensure_stream()
    name = data.draw(st.sampled_from(sorted(functions.ALL)), label="function")
    request = data.draw(requests(world, name), label="request")
    before = dump_state(world.settings.state_dir)

    reply = functions.ALL[name](request)

    assert _is_valid_reply(reply), reply
    if "error" in reply:
        assert set(reply) == {"error"}
        assert reply["error"]["code"] in ERROR_CODES, reply
        assert reply["error"]["code"] != "SERVER_ERR", reply  # a bug, not bad input
        assert dump_state(world.settings.state_dir) == before, (name, request, reply)
    elif name == "reserve" and reply["uid"] != world.uid:
        _release(world.settings, reply["uid"])  # valid by chance: clean up


@pytest.mark.parametrize("name", sorted(functions.ALL))
def test_a_request_that_is_not_json_data_is_bad_format(world, name):
    """Objects no JSON document holds (sets, bytes, non-string keys) reach no logic."""
    world.ensure_stream()
    before = dump_state(world.settings.state_dir)
    for request in ({"uid": {world.uid}}, {1: world.uid}, b"{}", {"uid": world.uid.encode()}):
        reply = functions.ALL[name](request)
        assert _is_valid_reply(reply)
        assert "error" in reply and reply["error"]["code"] == "BAD_FORMAT", (request, reply)
    assert dump_state(world.settings.state_dir) == before
