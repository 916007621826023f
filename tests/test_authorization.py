"""Only a stream's owner controls it (issue 16 §1): every call after reserve proves the
stream's control secret, derived from the client key; plain TCP only where a gateway
allows it; the operator's own commands. Real gateways, relays and SQLite throughout."""

from __future__ import annotations

import base64
import datetime
import json
import os
import sqlite3
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scistream_gateway import cli as gateway_cli
from scistream_gateway.errors import AuthError, BadFormat, InvalidUid, NotImplementedHere
from scistream_gateway.service import Gateway
from scistream_gateway.store import _MIGRATIONS
from scistream_prefect import LocalGateway, LocalPair
from scistream_prefect import ownership
from scistream_proxy.leaks import port_is_free
from scistream_proxy.tls import generate_certificate

from conftest import make_gateway, run_consumer
from gatewaykit import reserve

MiB = 2**20


def _row(gw, uid: str) -> tuple[dict, list[int]]:
    """Stream ``uid``'s row and ports as the gateway's database holds them."""
    db = sqlite3.connect(gw.settings.state_dir / "state.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        row = dict(db.execute("SELECT * FROM streams WHERE uid = ?", (uid,)).fetchone())
        ports = [r[0] for r in db.execute("SELECT port FROM ports WHERE uid = ?", (uid,))]
    finally:
        db.close()
    return row, ports


def _impostor(tmp_path: Path) -> tuple[str, str]:
    """An attacker's own certificate and its fingerprint."""
    return generate_certificate("impostor", tmp_path / "impostor.key", tmp_path / "impostor.pem",
                                datetime.timedelta(days=1))


def _key(seed: int) -> str:
    return base64.urlsafe_b64encode(bytes([seed]) * 32).decode()


def _without_counters(status: dict) -> dict:
    return {k: v for k, v in status.items() if k not in ("bytes", "connections")}


# -- a caller who knows only the uid -------------------------------------------------
def test_the_uid_alone_controls_nothing(gateways, producer_app, tmp_path):
    producer, consumer = gateways
    app = producer_app(2, 4 * MiB)
    stream = LocalPair(producer, consumer).open(app.listeners, num_conn=2)
    uid = stream.uid
    cert, fingerprint = _impostor(tmp_path)
    def snapshot() -> list:
        return [(_row(gw, uid), _without_counters(gw.call("status", {"uid": uid})))
                for gw in (producer, consumer)]

    before = snapshot()
    attempts = {
        "wait_hello": {"timeout_s": 0},
        "connect": {"remote_listeners": ["127.0.0.1:9"], "peer_certificate": cert,
                    "peer_fingerprint": fingerprint},
        "status": {},
        "renew": {"lease_s": 5},
        "release": {},
    }
    for gw in (producer, consumer):
        for verb, rest in attempts.items():
            for proof in ({"control": "wrong"}, {"control": None}, {}):
                request = {"uid": uid, **rest, **proof}
                if not proof:  # bypass the client's proofs: a request without one
                    with Gateway(gw.settings) as service, pytest.raises(AuthError) as refused:
                        getattr(service, verb)(request)
                else:
                    with pytest.raises(AuthError) as refused:
                        gw.call(verb, request)
                assert f"control secret of stream {uid} was not proven" in str(refused.value)
                assert "wrong" not in str(refused.value)
    assert snapshot() == before
    # The stream still carries the producer's data to its owner's consumer.
    code, received = run_consumer(stream.listeners)
    assert code == 0 and sum(r["bytes"] for r in received) == 4 * MiB, (received, snapshot())
    assert sorted(r["sha256"] for r in received) == sorted(r["sha256"] for r in app.result())
    stream.release()


def test_an_unknown_uid_stays_invalid_and_its_release_idempotent(gateways):
    producer, _ = gateways
    uid = str(uuid.uuid4())
    with pytest.raises(InvalidUid):
        producer.call("status", {"uid": uid, "control": "anything"})
    assert producer.call("release", {"uid": uid, "control": "anything"})["released"] is True


def test_the_attack_of_the_issue_is_refused_and_the_owner_pins_the_real_peer(
        gateways, producer_app, tmp_path):
    """A PROD stream in HELLO, connected by someone else to their own certificate."""
    producer, consumer = gateways
    app = producer_app(1, 2 * MiB)
    pair = LocalPair(producer, consumer)
    stream = pair.reserve(1)
    producer.call("hello", {"uid": stream.uid, "key": stream.key, "role": "PROD",
                            "app_listeners": app.listeners})
    cert, fingerprint = _impostor(tmp_path)
    with pytest.raises(AuthError, match="not proven"):
        producer.call("connect", {"uid": stream.uid, "control": "guessed",
                                  "remote_listeners": ["127.0.0.1:9"],
                                  "peer_certificate": cert, "peer_fingerprint": fingerprint})
    assert producer.call("status", {"uid": stream.uid})["state"] == "HELLO"
    stream.connect(app.listeners)
    row, _ = _row(producer, stream.uid)
    assert row["peer_fingerprint"] == stream.cons["cert_fingerprint"]
    code, received = run_consumer(stream.listeners)
    assert code == 0 and received[0]["bytes"] == 2 * MiB
    stream.release()


def test_a_repeat_connect_with_another_peer_is_refused_and_the_pin_stays(gateways, tmp_path):
    producer, consumer = gateways
    stream = LocalPair(producer, consumer).reserve(1)
    stream.connect(["127.0.0.1:9"])
    real = {"uid": stream.uid, "remote_listeners": stream.prod["listeners"],
            "peer_certificate": stream.prod["certificate"],
            "peer_fingerprint": stream.prod["cert_fingerprint"]}
    cert, fingerprint = _impostor(tmp_path)
    before = _row(consumer, stream.uid)
    # The owner's own client proves the secret: the pin is what refuses.
    with pytest.raises(AuthError, match="another peer"):
        consumer.call("connect", {**real, "peer_certificate": cert,
                                  "peer_fingerprint": fingerprint})
    assert _row(consumer, stream.uid) == before
    assert before[0]["peer_fingerprint"] == stream.prod["cert_fingerprint"]
    assert consumer.call("connect", real)["state"] == "CONNECTED"  # the same peer: idempotent
    stream.release()


def test_a_repeat_reserve_needs_the_same_control_secret(gateways):
    producer, _ = gateways
    uid, key, reply = reserve(producer, num_conn=1)
    try:
        with pytest.raises(AuthError, match="another client"):
            reserve(producer, num_conn=1, uid=uid, key=key, control_sha256="0" * 64)
        assert reserve(producer, num_conn=1, uid=uid, key=key)[2] == reply
    finally:
        producer.call("release", {"uid": uid})


# -- plain TCP between gateways ------------------------------------------------------
def test_plain_tcp_is_refused_unless_the_gateway_allows_it(gateway_root, producer_app):
    with LocalPair(make_gateway(gateway_root, "strict-p"),
                   make_gateway(gateway_root, "strict-c")) as strict:
        stream = strict.reserve(1)
        before = _row(strict.consumer, stream.uid)
        with pytest.raises(NotImplementedHere, match="allow_plain_tcp"):
            strict.consumer.call("connect", {"uid": stream.uid, "tls": False,
                                             "remote_listeners": stream.prod["listeners"]})
        assert _row(strict.consumer, stream.uid) == before
        assert strict.consumer.call("status", {"uid": stream.uid})["state"] == "RESERVED"
        stream.release()
    with LocalPair(make_gateway(gateway_root, "plain-p", allow_plain_tcp=True),
                   make_gateway(gateway_root, "plain-c", allow_plain_tcp=True)) as plain:
        app = producer_app(1, MiB)
        stream = plain.open(app.listeners, tls=False)
        code, received = run_consumer(stream.listeners)
        assert code == 0 and received[0]["bytes"] == MiB
        assert _row(plain.producer, stream.uid)[0]["tls"] == 0
        stream.release()


# -- list_streams --------------------------------------------------------------------
def test_list_streams_shows_only_the_owners_streams(gateways, monkeypatch):
    producer, _ = gateways
    monkeypatch.setenv(ownership.CLIENT_KEY_ENV, _key(1))
    mine = [reserve(producer, num_conn=1)[0] for _ in range(2)]
    monkeypatch.setenv(ownership.CLIENT_KEY_ENV, _key(2))
    theirs = reserve(producer, num_conn=1)[0]
    listed = producer.call("list_streams", {})["streams"]
    assert [s["uid"] for s in listed] == [theirs]
    assert set(listed[0]) == {"uid", "role", "state", "created", "lease_expires", "bytes"}
    producer.call("release", {"uid": theirs})
    assert producer.call("list_streams", {})["streams"] == []
    monkeypatch.setenv(ownership.CLIENT_KEY_ENV, _key(1))
    listed = producer.call("list_streams", {})["streams"]
    assert [s["uid"] for s in listed] == mine[::-1]  # newest first
    assert all(s["state"] == "RESERVED" for s in listed)
    assert producer.call("list_streams", {"owner": "somebody else"})["streams"] == []
    for uid in mine:
        producer.call("release", {"uid": uid})


# -- the client key -------------------------------------------------------------------
def test_the_client_key_file_is_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.delenv(ownership.CLIENT_KEY_ENV, raising=False)
    monkeypatch.setenv(ownership.CONFIG_DIR_ENV, str(tmp_path / "config" / "scistream"))
    key = ownership.client_key()
    path = ownership.key_path()
    assert len(key) == 32 and path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ownership.client_key() == key
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    secret = ownership.control_secret("u")
    assert len(secret) == 43 and secret != ownership.control_secret("v")
    assert secret != ownership.owner_token()
    os.chmod(path, 0o644)
    with pytest.raises(BadFormat, match="open to others"):
        ownership.client_key()
    os.chmod(path, 0o600)
    path.write_text("too short\n")
    with pytest.raises(BadFormat, match="32 bytes"):
        ownership.client_key()


def test_the_environment_key_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(ownership.CONFIG_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(ownership.CLIENT_KEY_ENV, _key(7))
    assert ownership.client_key() == bytes([7]) * 32
    assert not ownership.key_path().exists()
    monkeypatch.setenv(ownership.CLIENT_KEY_ENV, "not a key")
    with pytest.raises(BadFormat, match=ownership.CLIENT_KEY_ENV):
        ownership.client_key()


def test_racing_processes_end_with_one_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ownership.CLIENT_KEY_ENV}
    env[ownership.CONFIG_DIR_ENV] = str(tmp_path / "race")
    # The module alone (not the client package, which imports Prefect): six processes
    # ready within a moment of each other, then released together.
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location("
            f"'ownership', {ownership.__file__!r}); module = importlib.util.module_from_spec("
            "spec); spec.loader.exec_module(module); sys.stdin.read();"
            " print(module.client_key().hex())")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    for proc in procs:
        proc.stdin.close()
    keys = {proc.stdout.read().strip() for proc in procs}
    assert all(proc.wait(timeout=60) == 0 for proc in procs)
    assert len(keys) == 1 and len(keys.pop()) == 64
    assert [p.name for p in (tmp_path / "race").iterdir()] == ["client.key"]


def test_with_proofs_adds_what_each_call_proves_and_keeps_given_fields():
    uid = str(uuid.uuid4())
    reserve_ = ownership.with_proofs("reserve", {"uid": uid})
    assert reserve_["control_sha256"] == ownership.sha256_hex(ownership.control_secret(uid))
    assert reserve_["owner_sha256"] == ownership.sha256_hex(ownership.owner_token())
    for verb in ("wait_hello", "connect", "status", "renew", "release"):
        assert ownership.with_proofs(verb, {"uid": uid}) == {
            "uid": uid, "control": ownership.control_secret(uid)}
    assert ownership.with_proofs("status", {"uid": uid, "control": "given"})["control"] == "given"
    assert ownership.with_proofs("list_streams", {}) == {"owner": ownership.owner_token()}
    assert ownership.with_proofs("hello", {"uid": uid}) == {"uid": uid}
    assert ownership.with_proofs("gateway_info", {}) == {}


def test_no_secret_reaches_the_gateways_files(gateways):
    producer, consumer = gateways
    stream = LocalPair(producer, consumer).reserve(1)
    stream.connect(["127.0.0.1:9"])
    with pytest.raises(AuthError):
        producer.call("status", {"uid": stream.uid, "control": "wrong"})
    stream.status()
    stream.release()
    secrets_ = [ownership.control_secret(stream.uid).encode(), ownership.owner_token().encode(),
                base64.urlsafe_b64encode(ownership.client_key()).rstrip(b"=")]
    for gw in (producer, consumer):
        for path in gw.settings.state_dir.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s in data for s in secrets_), path


# -- the gateway's state -------------------------------------------------------------
def test_a_stream_from_before_control_secrets_is_the_operators(gateway_root):
    """A state directory written by the previous schema: the migration keeps the row,
    no proof can match it, the operator can release it."""
    state = gateway_root / "old-gw"
    state.mkdir(mode=0o700)
    db = sqlite3.connect(state / "state.sqlite3", isolation_level=None)
    for version in (1, 2):
        db.executescript(_MIGRATIONS[version])
    db.execute("PRAGMA user_version = 2")
    uid = str(uuid.uuid4())
    db.execute("INSERT INTO streams (uid, role, state, num_conn, rate, lease_expires, listeners,"
               " cert_fingerprint, certificate, backend, created, updated) VALUES"
               " (?, 'CONS', 'RESERVED', 1, 0, 9e9, '[]', '', '', 'native', 1, 1)", (uid,))
    db.close()
    gw = make_gateway(gateway_root, "old-gw")
    with pytest.raises(AuthError, match="not proven"):
        gw.call("status", {"uid": uid})
    with pytest.raises(AuthError, match="not proven"):
        gw.call("release", {"uid": uid})
    with Gateway(gw.settings) as service:
        assert service.operator_release(uid) == {"uid": uid, "released": True}
        assert service.store.get(uid).state == "RELEASED"


def test_a_missing_state_dir_is_created_private(tmp_path):
    """Issue 17 §2: a settings file written by hand, its state_dir not there yet."""
    state_dir = tmp_path / "not" / "yet" / "state"
    settings = tmp_path / "gateway.toml"
    settings.write_text(f'[gateway]\nname = "by-hand"\nstate_dir = "{state_dir}"\n'
                        'port_range = [29980, 29989]\n')
    gw = LocalGateway(settings_path=settings)
    assert gw.call("gateway_info", {})["name"] == "by-hand"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert (state_dir / "workers.log").exists()


# -- the operator's commands ---------------------------------------------------------
def test_operator_lists_and_releases_any_owners_streams(gateways, monkeypatch, capsys):
    producer, _ = gateways
    settings = str(producer.settings_path)
    monkeypatch.setenv(ownership.CLIENT_KEY_ENV, _key(3))
    uid, _, reply = reserve(producer, num_conn=2)
    monkeypatch.setenv(ownership.CLIENT_KEY_ENV, _key(4))  # the operator holds no key
    assert gateway_cli.main(["streams", "--settings", settings, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(s["uid"], s["role"], s["state"]) for s in listed] == [(uid, "PROD", "RESERVED")]
    assert gateway_cli.main(["streams", "--settings", settings]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["uid", "role", "state", "age", "lease", "bytes"]
    assert table[1].split()[:3] == [uid, "PROD", "RESERVED"]
    with pytest.raises(AuthError):
        producer.call("release", {"uid": uid})
    assert gateway_cli.main(["release", uid, "--settings", settings]) == 0
    assert json.loads(capsys.readouterr().out) == {"uid": uid, "released": True}
    assert all(port_is_free(a) for a in reply["listeners"])
    assert not (producer.settings.state_dir / "streams" / uid).exists()
    assert gateway_cli.main(["streams", "--settings", settings, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert gateway_cli.main(["streams", "--settings", settings, "--json", "--all"]) == 0
    assert [s["state"] for s in json.loads(capsys.readouterr().out)] == ["RELEASED"]
    assert gateway_cli.main(["release", "not-a-uid", "--settings", settings]) == 2
    assert "BAD_FORMAT" in capsys.readouterr().err
