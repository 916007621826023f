"""A stream for the length of a ``with`` block inside a user's flow; always released.

:func:`stream_session` opens the stream with tasks of the calling flow (no subflow),
renews both leases from a background thread while the block runs, and releases both
ends when the block ends: normally, by an exception, or by a ``KeyboardInterrupt``.

A flow run that is *cancelled* may be killed before any ``finally`` runs (a served or
worker-run deployment is a process that gets terminated). So the session also stores
the identifiers needed to release (uid and the two gateways' fields, never the hello
key) in a Prefect Variable named after the flow run, and
:func:`release_session_streams` — given to the flow as its ``on_cancellation`` (and
``on_crashed``) hook — releases from those. The gateways' own lease expiry is the last
line: a stream whose client vanished is reaped when its lease runs out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.variables import Variable

from scistream_prefect.compute import GlobusComputeGateway
from scistream_prefect.flows.streams import StreamHandle, setup_stream, teardown_stream
from scistream_prefect.gateways import Gateway, LocalGateway

__all__ = ["release_session_streams", "stream_session"]

log = logging.getLogger("scistream_prefect")

_BLOCKS = {cls.__name__: cls for cls in (LocalGateway, GlobusComputeGateway)}
_VARIABLE_PREFIX = "scistream-session-"
_REMEMBER_LOCK = threading.Lock()


def _variable_name(flow_run_id) -> str:
    return f"{_VARIABLE_PREFIX}{flow_run_id}"


def _gateway_record(gateway: Gateway) -> dict:
    name = type(gateway).__name__
    if name not in _BLOCKS:
        raise TypeError(f"a session needs a gateway block ({', '.join(_BLOCKS)}), "
                        f"not {name}: a cancelled run must be able to rebuild it")
    return {"block": name, "fields": gateway.model_dump(mode="json")}


def _gateway_from_record(record: dict) -> Gateway:
    return _BLOCKS[record["block"]](**record["fields"])


def _remember(flow_run_id, uid: str, producer: Gateway, consumer: Gateway) -> None:
    with _REMEMBER_LOCK:
        name = _variable_name(flow_run_id)
        streams = Variable.get(name, default=None) or {}
        streams[uid] = {"producer": _gateway_record(producer),
                        "consumer": _gateway_record(consumer)}
        Variable.set(name, streams, overwrite=True)


def _forget(flow_run_id, uid: str) -> None:
    with _REMEMBER_LOCK:
        name = _variable_name(flow_run_id)
        streams = Variable.get(name, default=None) or {}
        streams.pop(uid, None)
        if streams:
            Variable.set(name, streams, overwrite=True)
        else:
            Variable.unset(name)


class _LeaseRenewer(threading.Thread):
    """Renews both ends' leases every ``interval_s`` until stopped."""

    def __init__(self, producer: Gateway, consumer: Gateway, uid: str, interval_s: float,
                 lease_s: int | None, logger):
        super().__init__(name=f"scistream-renew-{uid[:8]}", daemon=True)
        self.gateways, self.uid, self.interval_s = (producer, consumer), uid, interval_s
        self.lease_s, self.logger = lease_s, logger
        self.stopped = threading.Event()
        self.renewals = 0

    def run(self) -> None:
        request = {"uid": self.uid}
        if self.lease_s is not None:
            request["lease_s"] = self.lease_s
        while not self.stopped.wait(self.interval_s):
            for gateway in self.gateways:
                try:
                    expires = gateway.call("renew", request)["lease_expires"]
                    self.logger.debug("renewed %s on %s until %s", self.uid, gateway.label,
                                      expires)
                except Exception as exc:  # noqa: BLE001 - retried at the next interval
                    self.logger.warning("renewing stream %s on %s failed: %s", self.uid,
                                        gateway.label, exc)
            self.renewals += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join()


@contextmanager
def stream_session(
    producer: Gateway,
    consumer: Gateway,
    *,
    renew_every_s: float | None = None,
    lease_s: int | None = None,
    **setup: object,
) -> Iterator[StreamHandle]:
    """Open a stream for a ``with`` block of a flow; release it however the block ends.

    Args:
        producer: the producer-side gateway block.
        consumer: the consumer-side gateway block.
        renew_every_s: how often both leases are renewed while the block runs; by
            default a third of the lease the gateways granted.
        lease_s: lease asked of both gateways at reserve and at each renewal.
        **setup: the other arguments of :func:`~scistream_prefect.setup_stream`
            (``num_conn``, ``app_listeners``, ``uid``, ``hello_key``, ``tls``, ...).

    Give the flow :func:`release_session_streams` as its ``on_cancellation`` and
    ``on_crashed`` hook, so a cancelled run releases too.

    Example:
        ```python
        from prefect import flow
        from scistream_prefect import LocalGateway, release_session_streams, stream_session

        @flow(on_cancellation=[release_session_streams], on_crashed=[release_session_streams])
        def pipeline():
            prod = LocalGateway.create("facility-p", "/tmp/facility-p", port_range=(51000, 51099))
            cons = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            with stream_session(prod, cons, num_conn=2, app_listeners=["127.0.0.1:5074"]) as s:
                ...  # the consumer app connects to s.listeners
        ```
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("stream_session runs inside a flow (its tasks and its "
                           "cancellation hook need the flow run)")
    flow_run_id = context.flow_run.id
    logger = get_run_logger()
    handle = setup_stream(producer, consumer, lease_s=lease_s, **setup)
    state = "RELEASED"
    renewer = None
    try:
        _remember(flow_run_id, handle.uid, producer, consumer)
        interval = renew_every_s or max(1.0, (handle.lease_expires - time.time()) / 3)
        renewer = _LeaseRenewer(producer, consumer, handle.uid, interval, lease_s, logger)
        renewer.start()
        yield handle
    except BaseException as exc:
        state = f"RELEASED after {type(exc).__name__}"
        raise
    finally:
        if renewer is not None:
            renewer.stop()
        try:
            teardown_stream(producer, consumer, handle.uid, state=state)
            _forget(flow_run_id, handle.uid)
        except Exception:  # noqa: BLE001 - the block's own exception is the one to raise
            logger.exception("releasing stream %s failed; the cancellation hook or the "
                             "lease expiry will release it", handle.uid)


def release_session_streams(flow, flow_run, state) -> None:
    """Flow hook: release every stream a session of ``flow_run`` left open.

    Runs outside the flow's process when a deployment's run is cancelled, so it works
    from the identifiers the session stored, with direct gateway calls (no tasks).
    """
    name = _variable_name(flow_run.id)
    streams = Variable.get(name, default=None) or {}
    for uid, record in streams.items():
        for end in ("producer", "consumer"):
            try:
                gateway = _gateway_from_record(record[end])
                gateway.call("release", {"uid": uid})
                log.info("released stream %s on %s after the run ended %s", uid,
                         gateway.label, state.type.value if state is not None else "")
            except Exception as exc:  # noqa: BLE001 - try the other end and streams too
                log.error("could not release stream %s (%s end): %s", uid, end, exc)
    if streams:
        Variable.unset(name)
