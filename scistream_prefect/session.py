"""A stream for the length of a ``with`` block inside a user's flow; always released.

:func:`stream_session` opens the stream with tasks of the calling flow (no subflow),
renews both leases from a background thread while the block runs, and releases both
ends when the block ends: normally, by an exception, or by a ``KeyboardInterrupt``.

A flow run that is *cancelled* or killed may end before any ``finally`` runs (a served
or worker-run deployment is a process that gets terminated). So the stream's
identifiers (uid and the two gateways' fields, never the hello key) are stored before
its first ``reserve`` (see :mod:`scistream_prefect.recovery`), and
:func:`release_session_streams`, given to the flow as its ``on_cancellation`` and
``on_crashed`` hook, releases from those. The gateways' own lease expiry is the last
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

from scistream_prefect import streams_core as core
from scistream_prefect.flows.streams import StreamHandle, setup_stream, teardown_stream
from scistream_prefect.gateways import Gateway
from scistream_prefect.recovery import (
    forget_stream,
    gateway_record,
    release_session_streams,
)

__all__ = ["release_session_streams", "stream_session"]

log = logging.getLogger("scistream_prefect")

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
        while not self.stopped.wait(self.interval_s):
            for gateway in self.gateways:
                try:
                    expires = core.renew(gateway, self.uid, self.lease_s)
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
    for gateway in (producer, consumer):
        gateway_record(gateway)  # a TypeError now, before anything is reserved
    # setup_stream stores the identifiers before its first reserve and, asked to keep
    # them, leaves them stored until the release below.
    handle = setup_stream(producer, consumer, lease_s=lease_s, keep_record=True, **setup)
    state = "RELEASED"
    renewer = None
    try:
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
            forget_stream(flow_run_id, handle.uid)
        except Exception:  # noqa: BLE001 - the block's own exception is the one to raise
            logger.exception("releasing stream %s failed; the cancellation hook or the "
                             "lease expiry will release it", handle.uid)
