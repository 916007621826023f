"""What a flow run needs to release its streams after it was cancelled or killed.

A run that is cancelled or SIGKILLed may end before any ``finally`` of its own runs.
So before the first ``reserve`` of a stream, the identifiers needed to release it (its
uid and the two gateways' block fields, never the hello key) go into a Prefect
Variable named after the flow run; :func:`release_session_streams`, the ``on_cancellation``
and ``on_crashed`` hook of ``open-stream`` (and of a flow using a session), releases
from them, in whichever process Prefect runs the hook. Written *before* the reserve:
a run killed while it waits for the producer's hello already holds both ends.
The gateways' lease expiry is the last line, for a client with no Prefect runner
(``scistream open`` killed in a terminal).
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import logging
import threading

from prefect.context import SyncClientContext
from prefect.logging.loggers import flow_run_logger
from prefect.variables import Variable

from scistream_prefect.compute import GlobusComputeGateway
from scistream_prefect.gateways import Gateway, LocalGateway

__all__ = ["forget_stream", "forgotten", "in_background", "release_session_streams",
           "remember_stream", "rememberable"]

_BLOCKS = {cls.__name__: cls for cls in (LocalGateway, GlobusComputeGateway)}
_VARIABLE_PREFIX = "scistream-session-"
_RECORD_LOCK = threading.Lock()  # one read-modify-write of a run's Variable at a time


def variable_name(flow_run_id) -> str:
    return f"{_VARIABLE_PREFIX}{flow_run_id}"


def rememberable(*gateways: Gateway) -> bool:
    """Whether a hook can rebuild these gateways from their fields (saved block kinds)."""
    return all(type(gw).__name__ in _BLOCKS for gw in gateways)


def gateway_record(gateway: Gateway) -> dict:
    name = type(gateway).__name__
    if name not in _BLOCKS:
        raise TypeError(f"a session needs a gateway block ({', '.join(_BLOCKS)}), "
                        f"not {name}: a cancelled run must be able to rebuild it")
    return {"block": name, "fields": gateway.model_dump(mode="json")}


def gateway_from_record(record: dict) -> Gateway:
    return _BLOCKS[record["block"]](**record["fields"])


def remember_stream(flow_run_id, uid: str, producer: Gateway, consumer: Gateway) -> None:
    """Store what releasing stream ``uid`` needs, under the flow run's Variable."""
    with _RECORD_LOCK:
        name = variable_name(flow_run_id)
        streams = Variable.get(name, default=None) or {}
        streams[uid] = {"producer": gateway_record(producer),
                        "consumer": gateway_record(consumer)}
        Variable.set(name, streams, overwrite=True)


class _Writer:
    """One thread that makes, in order, the Prefect API writes a release does not wait
    for. Started with the first write, it stays for the process's life; the process
    drains it at exit."""

    def __init__(self):
        self.pending: collections.deque = collections.deque()  # the first one is being made
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def put(self, write, *args) -> None:
        # The caller's context goes along: Prefect's settings (which server) and run
        # context (an artifact belongs to the run that made it).
        with self.changed:
            self.pending.append((contextvars.copy_context(), write, args))
            self.changed.notify_all()
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="scistream-writer",
                                               daemon=True)
                self.thread.start()
                atexit.register(self.drained)  # runs before Prefect's exit handlers

    def run(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending)
                context, write, args = self.pending[0]
            try:
                context.run(_with_own_client, write, *args)
            except Exception as exc:  # noqa: BLE001 - a record left only costs a second release
                logging.getLogger("scistream_prefect").warning(
                    "%s did not reach the Prefect server: %s", write.__name__, exc)
            finally:
                with self.changed:
                    self.pending.popleft()
                    self.changed.notify_all()

    def drained(self, timeout_s: float | None = None) -> bool:
        """Whether every write put so far was made, waiting up to ``timeout_s``."""
        with self.changed:
            return self.changed.wait_for(lambda: not self.pending, timeout_s)


def _with_own_client(write, *args) -> None:
    # The caller's run may have ended, closing the client its context holds (Prefect's
    # get_client hands that one out): the write opens its own. Only this copy changes.
    SyncClientContext.__var__.set(None)
    write(*args)


_WRITER = _Writer()


def in_background(write, *args) -> None:
    """Call ``write(*args)`` on the writer thread, after the writes put before it: for a
    record or an artifact that a release must not wait for (a SQLite-backed server meets
    the writes of the task runs just ended with "503 busy", and the client's retry then
    waits 2 s). A failed write is logged, not raised."""
    _WRITER.put(write, *args)


def forget_stream(flow_run_id, uid: str) -> None:
    """Drop stream ``uid`` from the run's Variable (the Variable goes with its last one),
    in the background (:func:`in_background`): the stream is already released, and
    meanwhile the record only makes a hook release it again, which is harmless (release
    is idempotent). :func:`forgotten` waits for it."""
    in_background(_write_forget, flow_run_id, uid)


def forgotten(timeout_s: float | None = None) -> bool:
    """Wait until every background write of this process was made (a stream forgotten,
    an artifact published); True if so within ``timeout_s``."""
    return _WRITER.drained(timeout_s)


def _write_forget(flow_run_id, uid: str) -> None:
    with _RECORD_LOCK:
        name = variable_name(flow_run_id)
        streams = Variable.get(name, default=None) or {}
        streams.pop(uid, None)
        if streams:
            Variable.set(name, streams, overwrite=True)
        else:
            Variable.unset(name)


def release_session_streams(flow, flow_run, state) -> None:
    """Flow hook: release every stream ``flow_run`` left recorded (cancelled, crashed).

    Runs outside the flow's process when a deployment's run is cancelled or killed, so
    it works from the stored identifiers, with direct gateway calls (no tasks). A
    stream the run had already released is released again, harmlessly (idempotent).
    """
    log = flow_run_logger(flow_run, flow)  # the run's log in the UI, also from a hook
    name = variable_name(flow_run.id)
    streams = Variable.get(name, default=None) or {}
    failed = False
    for uid, record in streams.items():
        for end in ("producer", "consumer"):
            try:
                gateway = gateway_from_record(record[end])
                gateway.call("release", {"uid": uid})
                log.info("released stream %s on %s after the run ended %s", uid,
                         gateway.label, state.type.value if state is not None else "")
            except Exception as exc:  # noqa: BLE001 - try the other end and streams too
                failed = True
                log.error("could not release stream %s (%s end): %s; its lease expiry "
                          "will", uid, end, exc)
    if streams and not failed:
        Variable.unset(name)
