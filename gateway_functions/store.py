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
from collections.abc import Collection, Iterator
from pathlib import Path

from scistream_gateway.protocol import State

__all__ = ["Store", "StreamRow"]

SCHEMA_VERSION = 3  # PRAGMA user_version
# How long a worker waits for the write lock (or the switch to WAL) before the gateway
# answers UNAVAILABLE: past that it is overloaded, which a client may retry later.
BUSY_TIMEOUT_S = 60.0

_SCHEMA_V1 = """
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

# Each step takes the database from version ``n - 1`` to ``n``, in one transaction.
_MIGRATIONS = {
    1: _SCHEMA_V1,
    # busy: the worker (pid + kernel start time) running a reserve or connect of this
    # stream, set before that call starts or changes a proxy and cleared when it has
    # recorded the outcome. A row busy with a dead worker is half-done work to undo.
    2: "ALTER TABLE streams ADD COLUMN busy TEXT",
    # Ownership: SHA-256 of the stream's control secret (proven by every call after
    # reserve) and of its owner's token (list_streams), and the peer fingerprint that
    # connect pinned. Rows from before have none: only the operator can release them.
    3: """ALTER TABLE streams ADD COLUMN control_sha256 TEXT;
          ALTER TABLE streams ADD COLUMN owner_sha256 TEXT;
          ALTER TABLE streams ADD COLUMN peer_fingerprint TEXT;
          CREATE INDEX IF NOT EXISTS streams_owner ON streams(owner_sha256, created)""",
}


@dataclass
class StreamRow:
    uid: str
    role: str
    state: State
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
    busy: dict | None = None
    control_sha256: str | None = None
    owner_sha256: str | None = None
    peer_fingerprint: str | None = None

    @property
    def active(self) -> bool:
        return self.state in State.ACTIVE

    @classmethod
    def from_db(cls, row: sqlite3.Row) -> StreamRow:
        values = dict(row)
        for key in ("listeners", "app_listeners", "remote_listeners"):
            values[key] = json.loads(values[key])
        for key in ("proxy", "busy"):
            values[key] = json.loads(values[key]) if values.get(key) else None
        values["tls"] = bool(values["tls"])
        values["state"] = State(values["state"])
        return cls(**values)


class Store:
    """One gateway's state database; use :meth:`transaction` for every change."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self._use_wal(path)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        if self.version() < SCHEMA_VERSION:
            with self.transaction():  # executescript() would commit on its own
                # Read again under the write lock: another worker may have migrated.
                for version in range(self.version() + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version].split(";"):
                        if statement.strip():
                            self.db.execute(statement)
                    self.db.execute(f"PRAGMA user_version = {version}")
        elif self.version() > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{path} has schema version {self.version()}; this gateway knows up to "
                f"{SCHEMA_VERSION}: downgrading the package needs a fresh state directory")

    def _use_wal(self, path: Path) -> None:
        """Switch the database to WAL (a lasting property of the file), waiting its turn.

        The switch needs the file to itself for a moment, and SQLite answers "database
        is locked" at once, without its busy wait, while another connection holds it:
        as when a new gateway's workers first open its database together. Once the file
        is in WAL the pragma only reads the mode, so only those first opens wait here.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.001
        while True:
            try:
                mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                mode = None
            if mode == "wal":
                return
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError(
                    f"database is locked: {path} stayed in journal mode {mode!r}"
                    f" for {BUSY_TIMEOUT_S} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

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
            " listeners, cert_fingerprint, certificate, backend, proxy, busy, control_sha256,"
            " owner_sha256, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (stream.uid, stream.role, stream.state, stream.num_conn, stream.rate,
             stream.key_sha256, stream.lease_expires, json.dumps(stream.listeners),
             stream.cert_fingerprint, stream.certificate, stream.backend,
             json.dumps(stream.proxy) if stream.proxy else None,
             json.dumps(stream.busy) if stream.busy else None, stream.control_sha256,
             stream.owner_sha256, now, now),
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

    def delete(self, uid: str) -> None:
        """Forget a stream that never got past ``State.STARTING``, with its ports."""
        self.free_ports(uid)
        self.db.execute("DELETE FROM streams WHERE uid = ?", (uid,))

    def free_stray_ports(self) -> int:
        """Drop port rows of streams that hold nothing any more; returns how many."""
        holding = sorted(State.HOLDING)
        marks = ",".join("?" * len(holding))
        return self.db.execute(
            f"DELETE FROM ports WHERE uid NOT IN (SELECT uid FROM streams WHERE state IN "
            f"({marks}))", holding).rowcount

    def busy_streams(self) -> list[StreamRow]:
        """Streams a reserve or connect is (or was, if its worker died) working on."""
        # One query: a row read apart from its uid could have been finished meanwhile.
        return [StreamRow.from_db(r) for r in self.db.execute(
            "SELECT * FROM streams WHERE busy IS NOT NULL")]

    def all_uids(self) -> dict[str, State]:
        """Every stream's uid and state."""
        return {uid: State(state)
                for uid, state in self.db.execute("SELECT uid, state FROM streams")}

    def streams(self, states: Collection[State] | None = None, owner_sha256: str | None = None,
                limit: int | None = None) -> list[StreamRow]:
        """Streams, newest first: those in ``states`` (all if None), of the owner whose
        token hashes to ``owner_sha256`` (any if None), at most ``limit``."""
        where, args = [], []
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += sorted(states)
        if owner_sha256 is not None:
            where.append("owner_sha256 = ?")
            args.append(owner_sha256)
        query = "SELECT * FROM streams" + (" WHERE " + " AND ".join(where) if where else "")
        query += " ORDER BY created DESC, uid"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        return [StreamRow.from_db(r) for r in self.db.execute(query, args)]

    def used_ports(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT port FROM ports")}

    def expired(self, now: float) -> list[str]:
        active = sorted(State.ACTIVE)
        marks = ",".join("?" * len(active))
        return [r[0] for r in self.db.execute(
            # A stream a live worker is connecting is left to it (and a dead one's to
            # reap_abandoned): expiring it would stop a proxy being changed.
            f"SELECT uid FROM streams WHERE state IN ({marks}) AND lease_expires < ?"
            " AND busy IS NULL",
            (*active, now))]

    def active_streams(self, states: Collection[State] = State.HOLDING) -> list[StreamRow]:
        """Streams in ``states``: by default every one that holds ports (a reserve in
        progress too, so two concurrent reserves never both fit the rate capacity)."""
        states = sorted(states)
        marks = ",".join("?" * len(states))
        return [StreamRow.from_db(r) for r in self.db.execute(
            f"SELECT * FROM streams WHERE state IN ({marks})", states)]
