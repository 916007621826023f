"""Tasks on one end of a stream, one remote gateway call each (each wraps the plain
call of the same name in :mod:`scistream_prefect.streams_core`).

Calls with side effects (reserve, connect, release) are never cached and never
retried blindly; the gateway functions are idempotent per ``uid``, so a caller that
lost a reply may call again with the same arguments. A malformed argument is
``BAD_FORMAT`` before any call; the read-only tasks retry only failures that may pass
(``UNAVAILABLE``, ``TIMEOUT``, a broken transport), never a refusal.

Each task's run is named after its verb and gateway (``reserve-local:prod-gw``), and
logs one line per call to the run's log: verb, gateway, uid, outcome (``ok`` or the
SciStream error code) and duration. Never the request: it carries proofs and keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import SecretStr

from scistream_gateway.errors import SciStreamError, Timeout, Unavailable
from scistream_gateway.protocol import ConnectReply, HelloReply, ReserveReply, StatusReply
from scistream_prefect import streams_core as core
from scistream_prefect.gateways import Gateway

__all__ = [
    "connect_gateway_proxy",
    "get_stream_status",
    "release_gateway_stream",
    "renew_stream_lease",
    "reserve_gateway_ports",
    "send_app_hello",
    "wait_for_app_hello",
]


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current run's logger (its lines reach the Prefect UI); outside a run, as when
    a task's ``.fn`` is called, the package's plain logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("scistream_prefect")


def _label(gateway: object) -> str:
    return str(getattr(gateway, "label", type(gateway).__name__))


def run_name(verb: str) -> Callable[..., str]:
    """A ``task_run_name`` naming the verb and the task's gateway (``reserve-local:p``),
    so two concurrent calls on two gateways tell apart in the UI. A callable, not a
    template, so an argument that is no gateway still reaches the task's BAD_FORMAT."""
    def name(parameters: dict) -> str:
        return f"{verb}-{_label(parameters.get('gateway'))}"
    return name


@contextmanager
def logged_call(gateway: Gateway, verb: str, uid: str | None) -> Iterator[None]:
    """Log the gateway call made inside the block: one line, whatever its outcome."""
    started = time.perf_counter()
    outcome, level = "ok", logging.INFO
    try:
        yield
    except SciStreamError as exc:
        outcome, level = exc.code, logging.WARNING
        raise
    except BaseException as exc:
        outcome, level = f"failed ({type(exc).__name__})", logging.WARNING
        raise
    finally:
        stream = f", stream {uid}" if uid else ""
        run_logger().log(level, "%s on %s%s: %s in %.0f ms", verb, _label(gateway), stream,
                         outcome, (time.perf_counter() - started) * 1000)


def retry_if_transient(task, task_run, state) -> bool:
    """Retry condition of the read-only tasks: not a refusal (bad input, no such uid),
    nor an endpoint reported offline (its call waits at the service until it is back)."""
    from scistream_prefect.compute import EndpointOffline

    error = state.data  # the engine's Failed state carries the exception
    if not isinstance(error, BaseException):
        try:
            state.result()
            return False
        except BaseException as exc:  # noqa: BLE001 - classified below
            error = exc
    if isinstance(error, EndpointOffline):
        return False
    if isinstance(error, (Unavailable, Timeout)):
        return True
    return not isinstance(error, SciStreamError)  # a transport failure may pass


@task(name="reserve-gateway-ports", task_run_name=run_name("reserve"),
      cache_policy=NO_CACHE)
def reserve_gateway_ports(
    gateway: Gateway, uid: str, role: str, num_conn: int, hello_key: SecretStr | str,
    rate: int = 0, lease_s: int | None = None,
) -> ReserveReply:
    """Reserve ``num_conn`` ports on one gateway and start its proxy for stream ``uid``.

    Not retried: a lost reply is recovered by calling again with the same ``uid``
    (the gateway is idempotent per uid), not blindly.

    Args:
        gateway: the gateway block.
        uid: the stream's id (a UUID the client picks).
        role: ``"PROD"`` (producer side) or ``"CONS"`` (consumer side).
        num_conn: ports to reserve, one per parallel connection.
        hello_key: the stream's hello key; only its SHA-256 leaves this task.
        rate: rate limit in kbit/s (0: unlimited).
        lease_s: lease in seconds (the gateway's default when not given).

    Returns:
        The gateway's reply: ``.listeners``, ``.cert_fingerprint``, ``.certificate``,
        ``.lease_expires``.

    Raises:
        NoResource: ports or rate capacity ran out. BadFormat: a malformed request.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import LocalGateway, reserve_gateway_ports, release_gateway_stream

        @flow
        def reserve_and_release():
            gw = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            uid = str(uuid.uuid4())
            reply = reserve_gateway_ports(gw, uid, "CONS", 2, secrets.token_urlsafe(32))
            release_gateway_stream(gw, uid)
            return reply.listeners
        ```
    """
    with logged_call(gateway, "reserve", uid):
        return core.reserve(gateway, uid, role, num_conn, hello_key, rate, lease_s)


@task(name="send-app-hello", task_run_name=run_name("hello"),
      cache_policy=NO_CACHE)
def send_app_hello(
    gateway: Gateway, uid: str, hello_key: SecretStr | str, role: str,
    app_listeners: list[str] | None = None,
) -> HelloReply:
    """Send an app controller's hello: the producer gives where its app listens.

    Args:
        gateway: the gateway of the controller's side.
        uid: the stream's id.
        hello_key: the stream's hello key (a ``SecretStr`` keeps it out of task records).
        role: ``"PROD"`` or ``"CONS"``.
        app_listeners: (producer) where the producer app listens.

    Returns:
        The gateway's reply: ``.listeners`` (for a consumer: where its app connects).

    Raises:
        AuthError: wrong key; the stream is unchanged.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import (LocalGateway, release_gateway_stream,
                                       reserve_gateway_ports, send_app_hello)

        @flow
        def producer_hello():
            prod = LocalGateway.create("facility-p", "/tmp/facility-p", port_range=(51000, 51099))
            uid, key = str(uuid.uuid4()), secrets.token_urlsafe(32)
            reserve_gateway_ports(prod, uid, "PROD", 1, key)
            listeners = send_app_hello(prod, uid, key, "PROD", ["127.0.0.1:5074"]).listeners
            release_gateway_stream(prod, uid)
            return listeners
        ```
    """
    with logged_call(gateway, "hello", uid):
        return core.hello(gateway, uid, hello_key, role, app_listeners)


@task(name="wait-for-app-hello", task_run_name=run_name("wait-hello"),
      cache_policy=NO_CACHE)
def wait_for_app_hello(
    gateway: Gateway, uid: str, max_wait_seconds: float = 300.0,
    poll_frequency_seconds: float = 10.0,
) -> list[str]:
    """Wait until the producer's controller said hello; return its ``app_listeners``.

    Args:
        gateway: the producer-side gateway.
        uid: the stream's id.
        max_wait_seconds: give up after this long.
        poll_frequency_seconds: each gateway call is a long-poll of up to this long
            (at most 20 s, the gateway's bound).

    Returns:
        Where the producer app listens, as its controller said.

    Raises:
        Timeout: no hello within ``max_wait_seconds``.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import (LocalGateway, release_gateway_stream,
                                       reserve_gateway_ports, send_app_hello,
                                       wait_for_app_hello)

        @flow
        def wait_for_producer():
            prod = LocalGateway.create("facility-p", "/tmp/facility-p", port_range=(51000, 51099))
            uid, key = str(uuid.uuid4()), secrets.token_urlsafe(32)
            reserve_gateway_ports(prod, uid, "PROD", 1, key)
            send_app_hello(prod, uid, key, "PROD", ["127.0.0.1:5074"])  # the controller
            app_listeners = wait_for_app_hello(prod, uid, max_wait_seconds=30)
            release_gateway_stream(prod, uid)
            return app_listeners
        ```
    """
    with logged_call(gateway, "wait_hello", uid):
        return core.wait_hello(gateway, uid, max_wait_seconds, poll_frequency_seconds)


@task(name="connect-gateway-proxy", task_run_name=run_name("connect"),
      cache_policy=NO_CACHE)
def connect_gateway_proxy(
    gateway: Gateway, uid: str, remote_listeners: list[str],
    peer_fingerprint: str | None, peer_certificate: str | None, tls: bool = True,
    hello_key: SecretStr | str | None = None, app_listeners: list[str] | None = None,
) -> ConnectReply:
    """Point one gateway's proxy at its targets and pin the peer gateway's certificate.

    The producer's connect may carry the producer's hello (``hello_key`` and
    ``app_listeners``): then no :func:`send_app_hello` is needed, and the setup is two
    round trips, ``reserve ‖ reserve`` -> ``connect ‖ connect``.

    Args:
        gateway: the gateway whose proxy to connect.
        uid: the stream's id.
        remote_listeners: the peer gateway's listeners (from its reserve).
        peer_fingerprint: SHA-256 of the peer's certificate (the pin).
        peer_certificate: the peer's certificate, PEM (the trust anchor).
        tls: ``False`` turns encryption off on the gateway-to-gateway hop and must be
            asked for by name.
        hello_key: (producer, with ``app_listeners``) the stream's hello key, for the
            hello this connect carries.
        app_listeners: (producer, with ``hello_key``) where the producer app listens.

    Returns:
        The gateway's reply once the proxy accepts: ``.uid``, ``.state``,
        ``.listeners``, ``.backend``.

    Raises:
        AuthError: the certificate does not match the fingerprint, or a wrong hello key;
            the stream is unchanged.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import (LocalGateway, connect_gateway_proxy,
                                       release_gateway_stream, reserve_gateway_ports,
                                       send_app_hello)

        @flow
        def connect_both_ends():
            prod = LocalGateway.create("facility-p", "/tmp/facility-p", port_range=(51000, 51099))
            cons = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            uid, key = str(uuid.uuid4()), secrets.token_urlsafe(32)
            p = reserve_gateway_ports(prod, uid, "PROD", 1, key)
            c = reserve_gateway_ports(cons, uid, "CONS", 1, key)
            # The producer's connect carries its hello: no send_app_hello round trip.
            connect_gateway_proxy(prod, uid, c.listeners, c.cert_fingerprint,
                                  c.certificate, hello_key=key,
                                  app_listeners=["127.0.0.1:5074"])
            connect_gateway_proxy(cons, uid, p.listeners, p.cert_fingerprint, p.certificate)
            for gw in (prod, cons):
                release_gateway_stream(gw, uid)
        ```
    """
    with logged_call(gateway, "connect", uid):
        return core.connect(gateway, uid, remote_listeners, peer_fingerprint,
                            peer_certificate, tls, hello_key, app_listeners)


@task(name="get-stream-status", task_run_name=run_name("status"),
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_if_transient)
def get_stream_status(gateway: Gateway, uid: str) -> StatusReply:
    """State, proxy liveness and byte counters of one stream end (read-only, so retried).

    Args:
        gateway: the gateway of that end.
        uid: the stream's id.

    Returns:
        The gateway's reply: ``.uid, .role, .state, .alive, .bytes, .connections, .pid,
        .lease_expires, .listeners``, and why when it failed (``.error_code``,
        ``.last_error``).

    Raises:
        InvalidUid: no such stream on that gateway.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import (LocalGateway, get_stream_status,
                                       release_gateway_stream, reserve_gateway_ports)

        @flow
        def check_stream():
            cons = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            uid = str(uuid.uuid4())
            reserve_gateway_ports(cons, uid, "CONS", 1, secrets.token_urlsafe(32))
            state = get_stream_status(cons, uid).state  # State.RESERVED
            release_gateway_stream(cons, uid)
            return state
        ```
    """
    with logged_call(gateway, "status", uid):
        return core.status(gateway, uid)


@task(name="renew-stream-lease", task_run_name=run_name("renew"),
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_if_transient)
def renew_stream_lease(gateway: Gateway, uid: str, lease_s: int | None = None) -> float:
    """Extend the lease of one stream end (retried: renewing twice is harmless).

    Args:
        gateway: the gateway of that end.
        uid: the stream's id.
        lease_s: the new lease from now (the gateway's default when not given).

    Returns:
        The new expiry, Unix time.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import (LocalGateway, release_gateway_stream,
                                       renew_stream_lease, reserve_gateway_ports)

        @flow
        def keep_alive():
            cons = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            uid = str(uuid.uuid4())
            reserve_gateway_ports(cons, uid, "CONS", 1, secrets.token_urlsafe(32), lease_s=60)
            expires = renew_stream_lease(cons, uid, lease_s=600)
            release_gateway_stream(cons, uid)
            return expires
        ```
    """
    with logged_call(gateway, "renew", uid):
        return core.renew(gateway, uid, lease_s)


@task(name="release-gateway-stream", task_run_name=run_name("release"),
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_if_transient)
def release_gateway_stream(gateway: Gateway, uid: str) -> bool:
    """Stop one end's proxy, free its ports, delete its keys (idempotent, so retried).

    Args:
        gateway: the gateway of that end.
        uid: the stream's id.

    Returns:
        True, also when the stream was already gone.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import LocalGateway, release_gateway_stream, reserve_gateway_ports

        @flow
        def reserve_then_release():
            cons = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            uid = str(uuid.uuid4())
            reserve_gateway_ports(cons, uid, "CONS", 2, secrets.token_urlsafe(32))
            assert release_gateway_stream(cons, uid)
            assert release_gateway_stream(cons, uid)  # twice is fine
        ```
    """
    with logged_call(gateway, "release", uid):
        return core.release(gateway, uid)

