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

import contextvars
import logging
import threading
import time

from prefect.logging.loggers import flow_run_logger
from prefect.variables import Variable

from scistream_prefect.compute import GlobusComputeGateway
from scistream_prefect.gateways import Gateway, LocalGateway

__all__ = ["forget_stream", "forgotten", "release_session_streams", "remember_stream",
           "rememberable"]

_BLOCKS = {cls.__name__: cls for cls in (LocalGateway, GlobusComputeGateway)}
_VARIABLE_PREFIX = "scistream-session-"
_RECORD_LOCK = threading.Lock()  # one read-modify-write of a run's Variable at a time
_FORGETTING_LOCK = threading.Lock()
_FORGETTING: list[threading.Thread] = []


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


def forget_stream(flow_run_id, uid: str) -> None:
    """Drop stream ``uid`` from the run's Variable (the Variable goes with its last one),
    in the background: the stream is already released, and this write comes right
    after task runs whose states a SQLite-backed server is still writing, so it often
    meets "503 busy" and waits out the client's 2 s retry. Meanwhile the record only
    makes a hook release the stream again, which is harmless (release is idempotent).
    The thread is not a daemon: the process waits for it at exit; :func:`forgotten`
    waits for it sooner."""
    thread = threading.Thread(target=contextvars.copy_context().run,  # Prefect's settings
                              args=(_forget, flow_run_id, uid), name=f"forget-{uid}")
    with _FORGETTING_LOCK:
        _FORGETTING.append(thread)
    thread.start()


def forgotten(timeout_s: float | None = None) -> bool:
    """Wait until every :func:`forget_stream` of this process has written; True if so."""
    with _FORGETTING_LOCK:
        threads = list(_FORGETTING)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def _forget(flow_run_id, uid: str) -> None:
    try:
        _write_forget(flow_run_id, uid)
    except Exception as exc:  # noqa: BLE001 - a record left only costs a second release
        logging.getLogger("scistream_prefect").warning(
            "could not drop stream %s from the run's record: %s", uid, exc)
    finally:
        with _FORGETTING_LOCK:
            _FORGETTING.remove(threading.current_thread())


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
