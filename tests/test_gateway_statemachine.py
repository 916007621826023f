"""Stateful property test (hypothesis): random sequences of gateway calls, proxy deaths
included, against a small gateway (12 ports, max 4 connections, a rate capacity), with
the gateway's invariants checked after every step:

- every port in the ports table belongs to exactly one active stream, and every active
  stream's ports are held by the kernel while its proxy lives;
- an active stream has its private directory and key; an ended one has neither, and no
  ports, and its proxy process is gone;
- the active streams' rates never exceed the capacity;
- the gateway's view of which streams are active matches a model of the calls made.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from scistream_gateway import functions
from scistream_gateway.settings import CONFIG_ENV, GatewaySettings
from scistream_prefect.ownership import with_proofs
from scistream_proxy.leaks import port_is_free, proxy_pids
from scistream_proxy.process import ProcessIdentity

pytestmark = pytest.mark.slow

CAPACITY = 10_000
ACTIVE = ("RESERVED", "HELLO", "CONNECTED", "FAILED")


def _call(name: str, request: dict) -> dict:
    """Gateway function ``name`` with this client's proofs of ownership added."""
    return functions.ALL[name](with_proofs(name, request))


def _key(uid: str) -> str:
    return f"key-of-{uid}"


class GatewayMachine(RuleBasedStateMachine):
    uids = Bundle("uids")

    @initialize()
    def start_gateway(self):
        self.root = Path(tempfile.mkdtemp(prefix="scistream-sm-"))
        self.settings = GatewaySettings(name="sm-gw", state_dir=self.root / "state",
                                        port_min=30200, port_max=30211, max_num_conn=4,
                                        rate_capacity=CAPACITY, allow_plain_tcp=True)
        path = self.root / "gateway.toml"
        path.write_text(self.settings.to_toml())
        self.saved_env = os.environ.get(CONFIG_ENV)
        os.environ[CONFIG_ENV] = str(path)
        self.active: dict[str, dict] = {}  # uid -> {"role", "rate", "killed"}
        self.ended: set[str] = set()
        self.identities: dict[str, ProcessIdentity] = {}
        assert _call("gateway_info", {})["free_ports"] == 12

    def teardown(self):
        if not hasattr(self, "root"):
            return
        for uid in list(self.active):
            _call("release", {"uid": uid})
        leaked = proxy_pids(under=self.root)
        if self.saved_env is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = self.saved_env
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        assert not leaked, f"proxies left running: {leaked}"

    # -- rules --------------------------------------------------------------------
    @rule(target=uids, role=st.sampled_from(["PROD", "CONS"]), num_conn=st.integers(1, 5),
          rate=st.sampled_from([1000, 2500, 6000, 0]))
    def reserve(self, role, num_conn, rate):
        uid = str(uuid.uuid4())
        reply = _call("reserve", {"uid": uid, "role": role, "num_conn": num_conn,
                                   "rate": rate, "lease_s": 600,
                                   "key_sha256": hashlib.sha256(_key(uid).encode()).hexdigest()})
        in_use = sum(s["rate"] for s in self.active.values())
        held = sum(s["num_conn"] for s in self.active.values())
        if num_conn > 4 or rate == 0 or in_use + rate > CAPACITY or held + num_conn > 12:
            assert reply["error"]["code"] == "NO_RESOURCE", reply
            self.ended.add(uid)  # never existed: must stay unknown
        else:
            assert "error" not in reply, reply
            self.active[uid] = {"role": role, "rate": rate, "num_conn": num_conn,
                                "killed": False, "state": "RESERVED", "app": None}
            status = _call("status", {"uid": uid})
            self.identities[uid] = ProcessIdentity(status["pid"],
                                                   ProcessIdentity.of(status["pid"]).start_time)
        return uid

    @rule()
    def gateway_info(self):
        info = _call("gateway_info", {})
        assert info["active_streams"] == len(self.active)
        assert info["rate_in_use"] == sum(s["rate"] for s in self.active.values())
        assert info["free_ports"] == 12 - sum(s["num_conn"] for s in self.active.values())

    @rule(uid=uids)
    def repeat_reserve(self, uid):
        """Idempotency: the same uid and parameters again changes nothing."""
        if uid not in self.active:
            return
        s = self.active[uid]
        reply = _call("reserve", {"uid": uid, "role": s["role"], "num_conn": s["num_conn"],
                                   "rate": s["rate"],
                                   "key_sha256": hashlib.sha256(_key(uid).encode()).hexdigest()})
        assert reply.get("uid") == uid, reply

    @rule(uid=uids, right_key=st.booleans())
    def hello(self, uid, right_key):
        s = self.active.get(uid)
        request = {"uid": uid, "key": _key(uid) if right_key else "wrong",
                   "role": s["role"] if s else "PROD"}
        if s and s["role"] == "PROD":
            request["app_listeners"] = ["127.0.0.1:9"]
        reply = _call("hello", request)
        if s is None or s["state"] == "FAILED":
            assert reply["error"]["code"] == "INVALID_UID", reply
        elif not right_key:
            assert reply["error"]["code"] == "AUTH_ERROR"
        elif s["role"] == "PROD" and s["state"] != "RESERVED" and s["app"] != "127.0.0.1:9":
            assert reply["error"]["code"] == "BAD_FORMAT", reply  # a connect's hello said :10
        else:
            assert "error" not in reply, reply
            if s["role"] == "PROD" and s["state"] == "RESERVED":
                s["state"], s["app"] = "HELLO", "127.0.0.1:9"

    @rule(uid=uids)
    def connect_plain(self, uid):
        s = self.active.get(uid)
        reply = _call("connect", {"uid": uid, "remote_listeners": ["127.0.0.1:9"],
                                   "tls": False})
        if s is None:
            assert reply["error"]["code"] == "INVALID_UID"
        elif s["killed"] and s["state"] in ("RESERVED", "HELLO"):
            assert reply["error"]["code"] in ("CONN_ERROR", "INVALID_UID"), reply
            if reply["error"]["code"] == "CONN_ERROR":
                s["state"] = "FAILED"
        elif s["state"] == "FAILED" or (s["role"] == "PROD" and s["state"] == "RESERVED"):
            assert reply["error"]["code"] == "INVALID_UID", reply
        else:
            assert reply.get("state") == "CONNECTED", reply
            s["state"] = "CONNECTED"

    @rule(uid=uids, right_key=st.booleans(), app=st.sampled_from(["127.0.0.1:9",
                                                                  "127.0.0.1:10"]))
    def connect_with_hello(self, uid, right_key, app):
        """The producer's connect carrying its hello: RESERVED -> CONNECTED in one step."""
        s = self.active.get(uid)
        reply = _call("connect", {"uid": uid, "remote_listeners": ["127.0.0.1:9"],
                                   "tls": False, "hello": {
                                       "key": _key(uid) if right_key else "wrong",
                                       "app_listeners": [app]}})
        if s is None or s["state"] == "FAILED":
            assert reply["error"]["code"] == "INVALID_UID", reply
        elif not right_key:
            assert reply["error"]["code"] == "AUTH_ERROR", reply
        elif s["role"] == "CONS":
            assert reply["error"]["code"] == "BAD_FORMAT", reply
        elif s["state"] != "RESERVED" and s["app"] != app:  # another hello recorded
            assert reply["error"]["code"] == "BAD_FORMAT", reply
        elif s["killed"] and s["state"] != "CONNECTED":
            assert reply["error"]["code"] == "CONN_ERROR", reply
            s["state"] = "FAILED"
        else:
            assert reply.get("state") == "CONNECTED", reply
            s["state"], s["app"] = "CONNECTED", app

    @rule(uid=uids)
    def kill_proxy(self, uid):
        s = self.active.get(uid)
        if s is None or s["killed"]:
            return
        identity = self.identities[uid]
        os.kill(identity.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while identity.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        # The native relay hosts every stream of the gateway: they all lose their proxy.
        for other, t in self.active.items():
            if self.identities[other] == identity:
                t["killed"] = True

    @rule(uid=uids)
    def status(self, uid):
        s = self.active.get(uid)
        reply = _call("status", {"uid": uid})
        if s is None:
            if uid in self.ended and "error" not in reply:
                assert reply["state"] == "RELEASED" and reply["alive"] is False
            return
        assert reply["alive"] is (not s["killed"]), reply
        if s["killed"]:
            assert reply["state"] == "FAILED"
            s["state"] = "FAILED"

    @rule(uid=uids)
    def renew(self, uid):
        reply = _call("renew", {"uid": uid, "lease_s": 900})
        if uid in self.active:
            assert reply["lease_expires"] > time.time() + 800
        else:
            assert reply["error"]["code"] == "INVALID_UID"

    @rule(uid=consumes(uids))
    def release(self, uid):
        assert _call("release", {"uid": uid}) == {"uid": uid, "released": True}
        self.active.pop(uid, None)
        self.ended.add(uid)

    # -- invariants -----------------------------------------------------------------
    @invariant()
    def state_is_consistent(self):
        if not hasattr(self, "root"):
            return
        with sqlite3.connect(self.settings.state_dir / "state.sqlite3") as db:
            rows = dict(db.execute("SELECT uid, state FROM streams").fetchall())
            ports = db.execute("SELECT port, uid FROM ports").fetchall()
        active = {uid for uid, state in rows.items() if state in ACTIVE}
        assert active == set(self.active)
        assert {uid for _, uid in ports} <= active
        assert sum(s["rate"] for s in self.active.values()) <= CAPACITY
        by_uid: dict[str, list[int]] = {}
        for port, uid in ports:
            by_uid.setdefault(uid, []).append(port)
        for uid, s in self.active.items():
            assert len(by_uid.get(uid, [])) == s["num_conn"]
            directory = self.settings.state_dir / "streams" / uid
            assert (directory / "key.pem").stat().st_mode & 0o777 == 0o600
            assert directory.stat().st_mode & 0o777 == 0o700
            if not s["killed"]:
                assert self.identities[uid].alive()
                assert not any(port_is_free(f"127.0.0.1:{p}") for p in by_uid[uid])
        serving = {self.identities[uid] for uid, s in self.active.items() if not s["killed"]}
        for uid in self.ended:
            assert not (self.settings.state_dir / "streams" / uid).exists()
            assert uid not in by_uid
            # Its proxy (the gateway's relay) runs on only while it serves another stream.
            if uid in self.identities and self.identities[uid] not in serving:
                assert not self.identities[uid].alive()


GatewayMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=12,
                                            deadline=None)
test_gateway_state_machine = GatewayMachine.TestCase
