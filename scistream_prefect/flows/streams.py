"""Open and release a stream between a producer gateway and a consumer gateway.

The protocol's sequential remote round trips are as few as it allows:
``reserve ‖ reserve`` -> ``hello`` (or ``wait_hello``) -> ``connect ‖ connect``.
:func:`setup_stream` runs those tasks inside whatever flow calls it (no subflow, so
no flow-run overhead); :func:`open_stream` is the same as a flow of its own.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.blocks.system import Secret
from prefect.futures import wait
from pydantic import BaseModel, Field, SecretStr

from scistream_gateway.errors import BadFormat
from scistream_gateway.protocol import is_canonical_uid, parse_address
from scistream_prefect.artifacts import publish_listeners, publish_summary
from scistream_prefect.compute import GlobusComputeGateway
from scistream_prefect.gateways import Gateway, LocalGateway
from scistream_prefect.recovery import (
    forget_stream,
    release_session_streams,
    remember_stream,
    rememberable,
)
from scistream_prefect.tasks.streams import (
    connect_gateway_proxy,
    release_gateway_stream,
    reserve_gateway_ports,
    send_app_hello,
    wait_for_app_hello,
)

__all__ = ["GatewayBlock", "StreamHandle", "open_stream", "release_stream", "setup_stream",
           "teardown_stream"]

#: A gateway a flow parameter can name: a saved block of either kind, or its fields.
GatewayBlock = LocalGateway | GlobusComputeGateway


class StreamHandle(BaseModel):
    """An open stream: where the consumer app connects, and what identifies it.

    It never holds the hello key: a handle is a flow's result, which Prefect may
    persist (pickled, in clear) in its result storage.
    """

    uid: str = Field(description="The stream's id on both gateways.")
    producer: str = Field(description="Label of the producer-side gateway.")
    consumer: str = Field(description="Label of the consumer-side gateway.")
    num_conn: int = Field(description="Parallel connections.")
    listeners: list[str] = Field(
        description="The consumer gateway's listeners: where the consumer app connects."
    )
    producer_listeners: list[str] = Field(description="The producer gateway's WAN listeners.")
    app_listeners: list[str] = Field(description="Where the producer app listens.")
    tls: bool = Field(description="Whether the gateway-to-gateway hop is encrypted.")
    producer_fingerprint: str = Field(description="SHA-256 of the producer proxy's certificate.")
    consumer_fingerprint: str = Field(description="SHA-256 of the consumer proxy's certificate.")
    setup_s: float = Field(description="Seconds from the first reserve to both proxies accepting.")
    lease_expires: float = Field(
        default=0.0, description="When the earlier of the two leases runs out (Unix time), "
        "unless renewed.",
    )


def _key_and_uid(uid: str | None, hello_key: SecretStr | str | None,
                 app_listeners: list[str] | None) -> tuple[str, SecretStr]:
    if app_listeners is None and (uid is None or hello_key is None):
        raise BadFormat("give app_listeners (the flow sends the producer's hello), or the uid "
                        "and hello key the producer's controller will use for its own hello")
    if uid is not None and not is_canonical_uid(uid):
        raise BadFormat(f"uid must be a lowercase canonical UUID, not {uid!r:.80}")
    if hello_key is None:
        hello_key = SecretStr(secrets.token_urlsafe(32))
    elif isinstance(hello_key, str):
        hello_key = SecretStr(hello_key)
    elif not isinstance(hello_key, SecretStr):
        raise BadFormat(f"hello_key must be a string, not {type(hello_key).__name__}")
    if not hello_key.get_secret_value():
        raise BadFormat("hello_key is empty")
    return uid or str(uuid.uuid4()), hello_key


def _check_setup(producer: object, consumer: object, num_conn: object, rate: object,
                 app_listeners: object, tls: object, lease_s: object,
                 hello_timeout_s: object) -> None:
    """Refuse a malformed request before anything is reserved (``BAD_FORMAT``)."""
    for name, gateway in (("producer", producer), ("consumer", consumer)):
        if not isinstance(gateway, Gateway):
            raise BadFormat(f"{name} must be a gateway block, not {type(gateway).__name__}")

    def integer(name: str, value: object, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BadFormat(f"{name} must be an integer >= {low}, not {value!r:.80}")

    integer("num_conn", num_conn, 1)
    integer("rate", rate, 0)
    if lease_s is not None:
        integer("lease_s", lease_s, 1)
    if not isinstance(tls, bool):
        raise BadFormat(f"tls must be True or False, not {tls!r:.80}")
    if (isinstance(hello_timeout_s, bool) or not isinstance(hello_timeout_s, (int, float))
            or not math.isfinite(hello_timeout_s) or hello_timeout_s < 0):
        raise BadFormat(f"hello_timeout_s must be a finite number >= 0, not "
                        f"{hello_timeout_s!r:.80}")
    if app_listeners is not None:
        if isinstance(app_listeners, (str, bytes)) or not isinstance(app_listeners,
                                                                    (list, tuple)):
            raise BadFormat("app_listeners must be a list of 'host:port' strings")
        if not app_listeners:
            raise BadFormat("app_listeners is empty")
        for address in app_listeners:
            parse_address(address, "app_listeners")


def setup_stream(
    producer: Gateway,
    consumer: Gateway,
    *,
    num_conn: int = 4,
    rate: int = 0,
    app_listeners: list[str] | None = None,
    uid: str | None = None,
    hello_key: SecretStr | str | None = None,
    tls: bool = True,
    lease_s: int | None = None,
    hello_timeout_s: float = 300.0,
    keep_record: bool = False,
) -> StreamHandle:
    """Open a stream with tasks of the calling flow; on any failure, release both ends.

    A malformed argument is ``BAD_FORMAT`` before anything is reserved. Inside a flow
    run (with gateway blocks), the identifiers needed to release the stream are stored
    before the first reserve (:mod:`scistream_prefect.recovery`), so the flow's
    ``on_cancellation`` / ``on_crashed`` hook can release a stream whose run was
    cancelled or killed halfway.

    Args:
        producer: the gateway in front of the producer app.
        consumer: the gateway in front of the consumer app.
        num_conn: parallel connections; connection *i* goes to ``app_listeners[i % n]``.
        rate: stream rate limit in kbit/s (0 = unlimited).
        app_listeners: where the producer app listens; given, the flow sends the
            producer's hello itself. Otherwise it waits for the producer's controller,
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
    _check_setup(producer, consumer, num_conn, rate, app_listeners, tls, lease_s,
                 hello_timeout_s)
    uid, key = _key_and_uid(uid, hello_key, app_listeners)
    context = FlowRunContext.get()
    run_id = None
    if context is not None and context.flow_run is not None and rememberable(producer,
                                                                              consumer):
        run_id = context.flow_run.id
        remember_stream(run_id, uid, producer, consumer)
    started = time.perf_counter()
    reserve = {"uid": uid, "num_conn": num_conn, "hello_key": key, "rate": rate,
               "lease_s": lease_s}
    futures = [reserve_gateway_ports.submit(producer, role="PROD", **reserve),
               reserve_gateway_ports.submit(consumer, role="CONS", **reserve)]
    try:
        wait(futures)
        prod, cons = (f.result() for f in futures)
        if app_listeners is not None:
            send_app_hello(producer, uid, key, "PROD", app_listeners)
            app = [str(a) for a in app_listeners]
        else:
            app = wait_for_app_hello(producer, uid, max_wait_seconds=hello_timeout_s)
        futures = [
            connect_gateway_proxy.submit(producer, uid, cons["listeners"],
                                         cons["cert_fingerprint"], cons["certificate"], tls=tls),
            connect_gateway_proxy.submit(consumer, uid, prod["listeners"],
                                         prod["cert_fingerprint"], prod["certificate"], tls=tls),
        ]
        wait(futures)
        for future in futures:
            future.result()
    except BaseException:
        try:
            teardown_stream(producer, consumer, uid, state="FAILED (setup), released")
            if run_id is not None:
                forget_stream(run_id, uid)
        except BaseException:  # noqa: BLE001 - the original failure is the one to raise
            get_run_logger().exception("releasing stream %s after a failed setup failed; "
                                       "the run's hook or the lease expiry will", uid)
        raise
    setup_s = time.perf_counter() - started  # as documented: not the record's removal
    if run_id is not None and not keep_record:
        forget_stream(run_id, uid)
    handle = StreamHandle(
        uid=uid, producer=producer.label, consumer=consumer.label, num_conn=num_conn,
        listeners=cons["listeners"], producer_listeners=prod["listeners"], app_listeners=app,
        tls=tls, producer_fingerprint=prod["cert_fingerprint"],
        consumer_fingerprint=cons["cert_fingerprint"],
        setup_s=setup_s,
        lease_expires=min(prod["lease_expires"], cons["lease_expires"]),
    )
    publish_listeners(handle)
    publish_summary(uid, handle.producer, handle.consumer, "OPEN", setup_s=handle.setup_s,
                    num_conn=num_conn, tls=tls)
    return handle


def teardown_stream(producer: Gateway, consumer: Gateway, uid: str, *,
                    state: str = "RELEASED") -> None:
    """Release both ends concurrently (idempotent); raise the first failure after both ran.

    ``state`` is what the stream's summary artifact says afterwards.
    """
    futures = [release_gateway_stream.submit(producer, uid),
               release_gateway_stream.submit(consumer, uid)]
    wait(futures)
    failed = [gw.label for gw, f in zip((producer, consumer), futures, strict=True)
              if f.state.is_failed()]
    publish_summary(uid, producer.label, consumer.label,
                    f"RELEASE FAILED on {', '.join(failed)}" if failed else state)
    for future in futures:
        future.result()


@flow(name="open-stream", on_cancellation=[release_session_streams],
      on_crashed=[release_session_streams])
def open_stream(
    producer: GatewayBlock,
    consumer: GatewayBlock,
    num_conn: int = 4,
    rate: int = 0,
    app_listeners: list[str] | None = None,
    uid: str | None = None,
    hello_key_block: str | None = None,
    tls: bool = True,
    lease_s: int | None = None,
    hello_timeout_s: float = 300.0,
) -> StreamHandle:
    """Open a SciStream stream: reserve both ends, hello, connect both ends.

    See :func:`setup_stream` for the parameters. A run that is cancelled or crashes
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
