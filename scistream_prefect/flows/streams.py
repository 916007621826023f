"""Open and release a stream between a producer gateway and a consumer gateway.

The protocol's sequential remote round trips are as few as it allows:
``reserve ‖ reserve`` -> ``connect ‖ connect``, the producer's connect carrying its
hello when the flow was given ``app_listeners``; with the producer's controller saying
hello itself, ``reserve ‖ reserve`` -> ``wait_hello`` -> ``connect ‖ connect``.
:func:`setup_stream` runs those tasks inside whatever flow calls it (no subflow, so
no flow-run overhead); :func:`open_stream` is the same as a flow of its own. The logic
is :func:`scistream_prefect.streams_core.open_ends`, which ``scistream open`` also runs
without a flow.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor

from prefect import flow
from prefect.context import FlowRunContext
from prefect.blocks.system import Secret
from prefect.futures import wait
from prefect.states import Failed
from pydantic import SecretStr

from scistream_prefect import streams_core as core
from scistream_prefect.artifacts import publish_listeners, publish_summary
from scistream_prefect.compute import GlobusComputeGateway
from scistream_prefect.gateways import Gateway, LocalGateway
from scistream_prefect.recovery import (
    forget_stream,
    in_background,
    release_session_streams,
    remember_stream,
    rememberable,
)
from scistream_prefect.streams_core import Addresses, LeaseS, NumConn, Rate, StreamHandle, WaitS
from scistream_prefect.tasks.streams import (
    connect_gateway_proxy,
    logged_call,
    release_gateway_stream,
    reserve_gateway_ports,
    run_logger,
    wait_for_app_hello,
)

__all__ = ["GatewayBlock", "StreamHandle", "open_stream", "release_stream", "setup_stream",
           "teardown_stream"]

#: A gateway a flow parameter can name: a saved block of either kind, or its fields.
GatewayBlock = LocalGateway | GlobusComputeGateway

_TASKS = {core.reserve: reserve_gateway_ports, core.wait_hello: wait_for_app_hello,
          core.connect: connect_gateway_proxy}


class _TaskSteps(core.Steps):
    """The open logic's calls as tasks of the calling flow; after a failed setup, the
    summary says so and the stored record goes once both ends are released."""

    def __init__(self, run_id):
        self.run_id = run_id

    def one(self, step, *args, **kwargs):
        return _TASKS[step](*args, **kwargs)

    def both(self, step, first, second):
        futures = [_TASKS[step].submit(*args, **kwargs) for args, kwargs in (first, second)]
        wait(futures)
        return tuple(f.result() for f in futures)

    def teardown(self, producer, consumer, uid):
        teardown_stream(producer, consumer, uid, state="FAILED (setup), released")
        if self.run_id is not None:
            forget_stream(self.run_id, uid)

    def teardown_failed(self, uid):
        run_logger().exception("releasing stream %s after a failed setup failed; the "
                               "run's hook or the lease expiry will", uid)


def setup_stream(
    producer: Gateway,
    consumer: Gateway,
    *,
    num_conn: NumConn = 4,
    rate: Rate = 0,
    app_listeners: Addresses | None = None,
    uid: str | None = None,
    hello_key: SecretStr | str | None = None,
    tls: bool = True,
    lease_s: LeaseS | None = None,
    hello_timeout_s: WaitS = 300.0,
    keep_record: bool = False,
) -> StreamHandle:
    """Open a stream with tasks of the calling flow; on any failure, release both ends.

    A malformed argument is ``BAD_FORMAT`` before anything is reserved (the bounds are
    those of the argument types, :mod:`scistream_prefect.streams_core`'s). Inside a flow
    run (with gateway blocks), the identifiers needed to release the stream are stored
    before the first reserve (:mod:`scistream_prefect.recovery`), so the flow's
    ``on_cancellation`` / ``on_crashed`` hook can release a stream whose run was
    cancelled or killed halfway.

    Args:
        producer: the gateway in front of the producer app.
        consumer: the gateway in front of the consumer app.
        num_conn: parallel connections; connection *i* goes to ``app_listeners[i % n]``.
        rate: stream rate limit in kbit/s (0 = unlimited).
        app_listeners: where the producer app listens; given, the flow is the
            producer's controller and its hello rides on the producer's connect (setup
            in two round trips). Otherwise it waits for the producer's controller,
            which must know ``uid`` and ``hello_key``.
        uid: the stream id (a UUID); generated when not given.
        hello_key: the key app controllers prove. When not given, a key is generated,
            used for the flow's own hello and dropped: no handle or result holds it, so
            a caller whose controllers say hello themselves makes the key and gives it.
        tls: encrypt and mutually authenticate the gateway-to-gateway hop (default).
            ``tls=False`` turns it off and must be asked for by name.
        lease_s: lease on both gateways (their default when not given).
        hello_timeout_s: how long to wait for the producer's hello.
        keep_record: keep the stored identifiers after a successful setup (a session
            does, until it releases); by default they are dropped once the stream is
            open, since it is then the caller's to release.
    """
    core.check_setup(producer, consumer, num_conn, rate, app_listeners, tls, lease_s,
                     hello_timeout_s)
    uid, key = core.key_and_uid(uid, hello_key, app_listeners)
    context = FlowRunContext.get()
    run_id = None
    if context is not None and context.flow_run is not None and rememberable(producer,
                                                                              consumer):
        run_id = context.flow_run.id
        remember_stream(run_id, uid, producer, consumer)
    handle = core.open_ends(producer, consumer, uid=uid, hello_key=key, num_conn=num_conn,
                            rate=rate, app_listeners=app_listeners, tls=tls, lease_s=lease_s,
                            hello_timeout_s=hello_timeout_s, steps=_TaskSteps(run_id))
    if run_id is not None and not keep_record:
        forget_stream(run_id, uid)
    publish_listeners(handle)
    publish_summary(uid, handle.producer, handle.consumer, "OPEN", setup_s=handle.setup_s,
                    num_conn=num_conn, tls=tls)
    run_logger().info(
        "stream %s open: consumer app connects to %s (%s), producer gateway listens at %s "
        "(%s), producer app at %s, %s, %d connection%s, setup %.2f s in %d round trips",
        uid,
        ", ".join(handle.listeners), handle.consumer, ", ".join(handle.producer_listeners),
        handle.producer, ", ".join(handle.app_listeners),
        "TLS" if tls else "plain TCP (no encryption)", num_conn, "s" if num_conn > 1 else "",
        handle.setup_s, handle.setup_round_trips)
    return handle


def _release_end(gateway: Gateway, uid: str) -> bool:
    """One end's release as :func:`release_gateway_stream` makes it (its log line, its
    retries of a failure that may pass), without a task run."""
    task, failures = release_gateway_stream, 0
    while True:
        try:
            with logged_call(gateway, "release", uid):
                return core.release(gateway, uid)
        except Exception as exc:
            failures += 1
            if failures > task.retries or not task.retry_condition_fn(
                    task, None, Failed(data=exc)):
                raise
        time.sleep(task.retry_delay_seconds)


def teardown_stream(producer: Gateway, consumer: Gateway, uid: str, *,
                    state: str = "RELEASED") -> None:
    """Release both ends concurrently (idempotent); raise the first failure after both ran.

    The two releases are direct gateway calls on two threads, each logged to the run's
    log and retried as :func:`release_gateway_stream` is, not task runs: two task runs
    tripled a session's exit (bench/controlplane.py) and showed the UI nothing the log
    does not. ``state`` is what the stream's summary artifact says afterwards; it is
    published in the background (:func:`~scistream_prefect.recovery.in_background`: an
    artifact is a server write that took longer than the two releases).
    """
    ends = (producer, consumer)
    with ThreadPoolExecutor(2) as pool:
        # Each thread runs in a copy of this one's context: the run's logger is found there.
        futures = [pool.submit(contextvars.copy_context().run, _release_end, gw, uid)
                   for gw in ends]
    failed = [gw.label for gw, f in zip(ends, futures, strict=True) if f.exception()]
    if failed:
        run_logger().warning("stream %s: release failed on %s", uid, ", ".join(failed))
    else:
        run_logger().info("stream %s released on %s and %s: proxies stopped, ports freed, "
                          "keys deleted", uid, producer.label, consumer.label)
    in_background(publish_summary, uid, producer.label, consumer.label,
                  f"RELEASE FAILED on {', '.join(failed)}" if failed else state)
    for future in futures:
        future.result()


@flow(name="open-stream", on_cancellation=[release_session_streams],
      on_crashed=[release_session_streams])
def open_stream(
    producer: GatewayBlock,
    consumer: GatewayBlock,
    num_conn: NumConn = 4,
    rate: Rate = 0,
    app_listeners: Addresses | None = None,
    uid: str | None = None,
    hello_key_block: str | None = None,
    tls: bool = True,
    lease_s: LeaseS | None = None,
    hello_timeout_s: WaitS = 300.0,
) -> StreamHandle:
    """Open a SciStream stream: reserve both ends, connect both ends (the producer's
    connect carrying its hello, or after waiting for the producer's controller).

    See :func:`setup_stream` for the parameters; their bounds are in the flow's
    parameter schema, so a deployment's form refuses a bad value, and a call with one
    fails before the run starts. A run that is cancelled or crashes
    (its process killed) before the stream is open releases both ends in its hooks.
    A flow's parameters are recorded as
    given, so the hello key is never one: ``hello_key_block`` names a Prefect
    ``Secret`` block that holds it (for app controllers that send their own hello);
    without it the flow generates a key for its own hello and returns it nowhere.

    Example:
        ```python
        from prefect import flow
        from scistream_prefect import LocalGateway, open_stream, release_stream

        @flow
        def pipeline():
            prod = LocalGateway.create("facility-p", "/tmp/facility-p", port_range=(51000, 51099))
            cons = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            handle = open_stream(prod, cons, num_conn=2, app_listeners=["127.0.0.1:5074"])
            ...  # the consumer app connects to handle.listeners
            release_stream(prod, cons, handle.uid)
        ```
    """
    hello_key = None
    if hello_key_block is not None:
        hello_key = SecretStr(Secret.load(hello_key_block).get())
    return setup_stream(
        producer, consumer, num_conn=num_conn, rate=rate, app_listeners=app_listeners, uid=uid,
        hello_key=hello_key, tls=tls, lease_s=lease_s, hello_timeout_s=hello_timeout_s,
    )


@flow(name="release-stream")
def release_stream(producer: GatewayBlock, consumer: GatewayBlock, uid: str) -> bool:
    """Release both ends of stream ``uid``: proxies stopped, ports freed, keys deleted.

    Safe to run again, and for a stream that is already gone.
    """
    teardown_stream(producer, consumer, uid)
    return True
