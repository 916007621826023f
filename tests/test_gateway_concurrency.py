"""Concurrency across processes: an endpoint's workers are separate processes sharing
one gateway's SQLite state. 50 of them reserving at the same instant never get the
same port, and the state stays consistent."""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import sqlite3
import time
import uuid

from scistream_gateway.settings import CONFIG_ENV, GatewaySettings
from scistream_gateway.store import Store
from scistream_prefect.ownership import with_proofs
from scistream_proxy.leaks import port_is_free, proxy_pids

import pytest

pytestmark = pytest.mark.slow

PROCESSES = 50


def _reserve_at_once(settings_path: str, barrier, request: dict, results) -> None:
    import os

    os.environ[CONFIG_ENV] = settings_path
    from scistream_gateway.functions import reserve

    barrier.wait(timeout=240)  # a worker that never came breaks it for all: no hang
    results.put((request["uid"], reserve(request)))


def _request(num_conn: int) -> dict:
    """A reserve of a new uid, with the proofs the client adds (made here: a worker
    process imports only the gateway side, as an endpoint worker does)."""
    uid = str(uuid.uuid4())
    return with_proofs("reserve", {"uid": uid, "role": "PROD", "num_conn": num_conn,
                                   "key_sha256": hashlib.sha256(uid.encode()).hexdigest()})


def _collect(workers, results, timeout_s: float) -> dict:
    """Every worker's (uid, reply); fails at once, naming exit codes, if one died."""
    replies, deadline = {}, time.monotonic() + timeout_s
    while len(replies) < len(workers):
        try:
            uid, reply = results.get(timeout=1)
            replies[uid] = reply
            continue
        except queue.Empty:
            pass
        died = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if died or time.monotonic() > deadline:
            for worker in workers:
                worker.kill()
            raise AssertionError(f"{len(replies)} of {len(workers)} workers replied; "
                                 f"exit codes of those that died: {died}")
    return replies


def test_fifty_processes_reserving_at_once_never_share_a_port(tmp_path, monkeypatch):
    # 50 streams of 2 ports each want 100 ports; the range has 90, so some must be
    # refused, cleanly, while the others share nothing.
    settings = GatewaySettings(name="busy", state_dir=tmp_path / "state",
                               port_min=30100, port_max=30189)
    path = tmp_path / "gateway.toml"
    path.write_text(settings.to_toml())
    ctx = multiprocessing.get_context("spawn")  # fresh processes, as endpoint workers are
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    # daemon: a worker still running when the test gives up cannot hold pytest's exit.
    workers = [ctx.Process(target=_reserve_at_once,
                           args=(str(path), barrier, _request(2), results), daemon=True)
               for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    replies = _collect(workers, results, timeout_s=300)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    try:
        granted = {uid: r for uid, r in replies.items() if "error" not in r}
        refused = {uid: r for uid, r in replies.items() if "error" in r}
        assert len(granted) == 45 and len(refused) == 5
        assert {r["error"]["code"] for r in refused.values()} == {"NO_RESOURCE"}
        assert all("exhausted" in r["error"]["message"] for r in refused.values())
        listeners = [a for r in granted.values() for a in r["listeners"]]
        assert len(listeners) == len(set(listeners)) == 90
        assert not any(port_is_free(a) for a in listeners)  # each held by its proxy

        with sqlite3.connect(settings.state_dir / "state.sqlite3") as db:
            rows = db.execute("SELECT uid, state FROM streams").fetchall()
            ports = db.execute("SELECT port, uid FROM ports").fetchall()
        assert {uid for uid, _ in rows} == set(granted)  # refused ones left no row
        assert {state for _, state in rows} == {"RESERVED"}
        assert sorted(p for p, _ in ports) == list(range(30100, 30190))
        by_uid = {}
        for port, uid in ports:
            by_uid.setdefault(uid, []).append(f"127.0.0.1:{port}")
        assert all(sorted(by_uid[u]) == sorted(r["listeners"]) for u, r in granted.items())
        stream_dirs = {p.name for p in (settings.state_dir / "streams").iterdir()}
        assert stream_dirs == set(granted)
        # One native relay holds every stream of the gateway.
        assert len(proxy_pids(under=tmp_path)) == 1
    finally:
        from scistream_gateway.functions import release

        monkeypatch.setenv(CONFIG_ENV, str(path))
        for uid in replies:
            assert release(with_proofs("release", {"uid": uid}))["released"]
    assert proxy_pids(under=tmp_path) == []
    assert all(port_is_free(f"127.0.0.1:{p}") for p in range(30100, 30190))


def _open_at_once(path: str, barrier, results) -> None:
    barrier.wait(timeout=60)
    try:
        store = Store(path)
        with store.transaction():
            pass
        store.close()
        results.put(None)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        results.put(repr(exc))


def test_a_new_gateways_workers_opening_its_database_at_once_all_get_in(tmp_path):
    # The first opens switch the new file to WAL; SQLite refuses that switch at once
    # (no busy wait) while another connection has the file open. Each round is a new
    # database opened by 8 processes at the same instant (failed about 1 round in 5
    # before the switch waited its turn).
    ctx = multiprocessing.get_context("fork")
    errors = []
    for round_ in range(20):
        barrier, results = ctx.Barrier(8), ctx.Queue()
        workers = [ctx.Process(target=_open_at_once, daemon=True,
                               args=(str(tmp_path / f"state-{round_}.sqlite3"), barrier, results))
                   for _ in range(8)]
        for worker in workers:
            worker.start()
        errors += [e for e in (results.get(timeout=120) for _ in workers) if e]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        with sqlite3.connect(tmp_path / f"state-{round_}.sqlite3") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert errors == []
