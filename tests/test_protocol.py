"""The typed wire contract: the docs match the models, refusals keep their messages,
one table of functions, one set of states."""

from __future__ import annotations

from pathlib import Path

import pytest

from scistream_gateway import functions, protocol
from scistream_gateway.errors import BadFormat, ServerError
from scistream_gateway.protocol import FUNCTIONS, ReserveRequest, State
from scistream_gateway.settings import GatewaySettings

WIRE_DOC = Path(__file__).resolve().parent.parent / "docs" / "wire.md"
UID = "0b5c4a1e-5f8a-4c1e-9d43-2f1f6ad2c7a1"
RESERVE = {"uid": UID, "role": "PROD", "num_conn": 2, "key_sha256": "0" * 64,
           "control_sha256": "1" * 64, "owner_sha256": "2" * 64}


def test_the_docs_show_the_schema_of_the_models():
    assert protocol.schema_section() in WIRE_DOC.read_text(), (
        "docs/wire.md is stale: run python -m scistream_gateway.protocol --schema docs/wire.md")


def test_one_table_names_the_shipped_functions():
    assert list(functions.ALL) == list(FUNCTIONS)
    assert all(f.request.model_config["extra"] == "forbid" for f in FUNCTIONS.values())


@pytest.mark.parametrize("raw, message", [
    ([], "request must be a JSON object, got list"),
    ({**RESERVE, "colour": 1}, "unknown fields ['colour']; this function takes "
     "['control_sha256', 'key_sha256', 'lease_s', 'num_conn', 'owner_sha256', 'rate', "
     "'role', 'uid']"),
    ({"uid": UID}, "missing fields ['role', 'num_conn', 'key_sha256', 'control_sha256', "
     "'owner_sha256']"),
    ({**RESERVE, "uid": UID.upper()}, "uid must be a lowercase canonical UUID such as "
     "'0b5c4a1e-5f8a-4c1e-9d43-2f1f6ad2c7a1'"),
    ({**RESERVE, "role": "prod"}, "role must be one of ['PROD', 'CONS']"),
    ({**RESERVE, "num_conn": True}, "num_conn must be an integer in [1, 65535]"),
    # The first bad field in today's order is the one reported.
    ({**RESERVE, "rate": -1, "key_sha256": "x"}, "rate must be an integer in [0, 1000000000]"),
    ({**RESERVE, "lease_s": 10**9}, "lease_s must be an integer in [1, 86400]"),
])
def test_refusals_keep_their_messages(tmp_path, raw, message):
    settings = GatewaySettings(name="gw", state_dir=tmp_path)
    with pytest.raises(BadFormat) as refused:
        ReserveRequest.parse(raw, settings)
    assert refused.value.message == message


@pytest.mark.parametrize("field, value", [
    ("key_sha256", "0" * 64 + "\n"),
    ("control_sha256", "1" * 64 + "\n"),
    ("remote_listeners", ["example.com\n:8080"]),
])
def test_a_trailing_newline_is_refused(tmp_path, field, value):
    """``$`` matched before a final newline; the checks now match the whole text."""
    settings = GatewaySettings(name="gw", state_dir=tmp_path)
    if field.endswith("_sha256"):
        with pytest.raises(BadFormat, match="64 lowercase hex"):
            ReserveRequest.parse({**RESERVE, field: value}, settings)
    else:
        with pytest.raises(BadFormat, match="is not 'host:port'"):
            protocol.ConnectRequest.parse({"uid": UID, "control": "c", "tls": False,
                                           field: value}, settings)
    assert not protocol.check_host("example.com\n")


def test_connect_checks_the_peer_only_with_tls(tmp_path):
    settings = GatewaySettings(name="gw", state_dir=tmp_path)
    plain = {"uid": UID, "control": "c", "tls": False, "remote_listeners": ["[::1]:5000"],
             "peer_fingerprint": "not checked without TLS"}
    assert protocol.ConnectRequest.parse(plain, settings).remote_listeners == ["[::1]:5000"]
    with pytest.raises(BadFormat, match="TLS needs peer_fingerprint"):
        protocol.ConnectRequest.parse({**plain, "tls": True}, settings)
    with pytest.raises(BadFormat, match="write IPv6 addresses as"):
        protocol.ConnectRequest.parse({**plain, "remote_listeners": ["::1:5000"]}, settings)


@pytest.mark.parametrize("function", ["wait_hello", "connect", "status", "renew", "release"])
def test_every_call_on_a_stream_takes_its_control_secret(tmp_path, function):
    settings = GatewaySettings(name="gw", state_dir=tmp_path)
    model = FUNCTIONS[function].request
    assert list(model.model_fields)[:2] == ["uid", "control"]
    # Required, but missing is parsed as "not proven" (AUTH_ERROR on the gateway).
    assert "control" in model.model_json_schema()["required"]
    rest = {"remote_listeners": ["h:1"], "tls": False} if function == "connect" else {}
    assert model.parse({"uid": UID, **rest}, settings).control is None
    with pytest.raises(BadFormat, match="control must be a string of 1-512 characters"):
        model.parse({"uid": UID, "control": "", **rest}, settings)
    assert "control" not in FUNCTIONS["hello"].request.model_fields


def test_replies_go_out_as_plain_json_with_only_what_was_set():
    reply = protocol.StatusReply(uid=UID, role="CONS", state=State.FAILED, alive=False,
                                 bytes=None, lease_expires=1.5, listeners=[], detail="gone",
                                 error_code="CONN_ERROR").wire()
    assert reply["state"] == "FAILED" and type(reply["state"]) is str
    assert "pid" not in reply and reply["bytes"] is None


def test_states_are_the_strings_of_the_wire_and_the_database():
    assert [s.value for s in State] == ["STARTING", "RESERVED", "HELLO", "CONNECTED",
                                        "RELEASED", "EXPIRED", "FAILED"]
    assert State.FAILED in State.ACTIVE and State.FAILED not in State.LIVE
    assert State.HOLDING == State.ACTIVE | {State.STARTING}
    assert "RESERVED" in State.AWAITING_HELLO


def test_settings_refuse_what_they_do_not_know(tmp_path):
    with pytest.raises(ServerError, match=r"unknown keys \['colour'\]"):
        GatewaySettings(name="gw", state_dir=tmp_path, colour="red")
    with pytest.raises(ServerError, match="max_num_conn must be a positive integer"):
        GatewaySettings(name="gw", state_dir=tmp_path, max_num_conn="8")


def test_a_connect_may_carry_the_producers_hello(tmp_path):
    settings = GatewaySettings(name="gw", state_dir=tmp_path)
    connect = {"uid": UID, "control": "c", "tls": False, "remote_listeners": ["h:1"]}
    assert protocol.ConnectRequest.parse(connect, settings).hello is None
    hello = {"key": "k", "app_listeners": ["[::1]:5074"]}
    parsed = protocol.ConnectRequest.parse({**connect, "hello": hello}, settings).hello
    # The listeners are checked by the gateway against the stream's num_conn, as hello's.
    assert parsed == ("k", ["[::1]:5074"])
    for bad, message in [
        ({"key": "k"}, "hello must be an object with exactly the fields key and app_listeners"),
        ({**hello, "role": "PROD"}, "hello must be an object with exactly the fields"),
        ("k", "hello must be an object with exactly the fields"),
        ({**hello, "key": ""}, "hello.key must be a string of 1-512 characters"),
    ]:
        with pytest.raises(BadFormat) as refused:
            protocol.ConnectRequest.parse({**connect, "hello": bad}, settings)
        assert refused.value.message.startswith(message)
