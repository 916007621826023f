"""Gateway state in SQLite (WAL): streams, the ports they hold, and their proxy handles.

Gateway functions run in separate, reused worker processes; every change of state
happens inside one ``BEGIN IMMEDIATE`` transaction, so two workers never hand out the
same port or move one stream through two transitions at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

__all__ = ["ACTIVE_STATES", "Store", "StreamRow"]

ACTIVE_STATES = ("RESERVED", "HELLO", "CONNECTED", "FAILED")
SCHEMA_VERSION = 1  # PRAGMA user_version; the schema is written once per database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    uid TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    state TEXT NOT NULL,
    num_conn INTEGER NOT NULL,
    rate INTEGER NOT NULL,
    key_sha256 TEXT,
    lease_expires REAL NOT NULL,
    listeners TEXT NOT NULL,
    app_listeners TEXT NOT NULL DEFAULT '[]',
    remote_listeners TEXT NOT NULL DEFAULT '[]',
    tls INTEGER NOT NULL DEFAULT 1,
    cert_fingerprint TEXT NOT NULL,
    certificate TEXT NOT NULL,
    backend TEXT NOT NULL,
    proxy TEXT,
    detail TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ports (
    port INTEGER PRIMARY KEY,
    uid TEXT NOT NULL REFERENCES streams(uid)
);
CREATE INDEX IF NOT EXISTS ports_uid ON ports(uid);
CREATE INDEX IF NOT EXISTS streams_state ON streams(state, lease_expires);
"""


@dataclass
class StreamRow:
    uid: str
    role: str
    state: str
    num_conn: int
    rate: int
    key_sha256: str | None
    lease_expires: float
    listeners: list[str]
    app_listeners: list[str]
    remote_listeners: list[str]
    tls: bool
    cert_fingerprint: str
    certificate: str
    backend: str
    proxy: dict | None
    detail: str = ""
    created: float = 0.0
    updated: float = 0.0
    ports: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @classmethod
    def from_db(cls, row: sqlite3.Row) -> StreamRow:
        values = dict(row)
        for key in ("listeners", "app_listeners", "remote_listeners"):
            values[key] = json.loads(values[key])
        values["proxy"] = json.loads(values["proxy"]) if values["proxy"] else None
        values["tls"] = bool(values["tls"])
        return cls(**values)


class Store:
    """One gateway's state database; use :meth:`transaction` for every change."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with self.transaction():  # executescript() would commit on its own
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction: committed on success, rolled back on error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get(self, uid: str) -> StreamRow | None:
        row = self.db.execute("SELECT * FROM streams WHERE uid = ?", (uid,)).fetchone()
        if row is None:
            return None
        stream = StreamRow.from_db(row)
        stream.ports = [r[0] for r in self.db.execute(
            "SELECT port FROM ports WHERE uid = ? ORDER BY port", (uid,))]
        return stream

    def insert(self, stream: StreamRow) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO streams (uid, role, state, num_conn, rate, key_sha256, lease_expires,"
            " listeners, cert_fingerprint, certificate, backend, proxy, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (stream.uid, stream.role, stream.state, stream.num_conn, stream.rate,
             stream.key_sha256, stream.lease_expires, json.dumps(stream.listeners),
             stream.cert_fingerprint, stream.certificate, stream.backend,
             json.dumps(stream.proxy), now, now),
        )
        self.db.executemany("INSERT INTO ports (port, uid) VALUES (?, ?)",
                            [(port, stream.uid) for port in stream.ports])

    def update(self, uid: str, **values: object) -> None:
        """Set columns of one stream (lists and dicts stored as JSON)."""
        encoded = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
                   for k, v in values.items()}
        encoded["updated"] = time.time()
        columns = ", ".join(f"{k} = ?" for k in encoded)
        self.db.execute(f"UPDATE streams SET {columns} WHERE uid = ?", (*encoded.values(), uid))

    def free_ports(self, uid: str) -> None:
        self.db.execute("DELETE FROM ports WHERE uid = ?", (uid,))

    def used_ports(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT port FROM ports")}

    def expired(self, now: float) -> list[str]:
        marks = ",".join("?" * len(ACTIVE_STATES))
        return [r[0] for r in self.db.execute(
            f"SELECT uid FROM streams WHERE state IN ({marks}) AND lease_expires < ?",
            (*ACTIVE_STATES, now))]

    def active_streams(self) -> list[StreamRow]:
        marks = ",".join("?" * len(ACTIVE_STATES))
        return [StreamRow.from_db(r) for r in self.db.execute(
            f"SELECT * FROM streams WHERE state IN ({marks})", ACTIVE_STATES)]
