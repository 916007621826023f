"""Streams as plain gateway calls, no Prefect: the one implementation that the Prefect
tasks and flows wrap and the command line runs directly.

One function per gateway call (each builds and checks its request and returns the
reply as its wire model, :mod:`scistream_gateway.protocol`'s), and :func:`open_ends`,
the open logic: ``reserve ‖ reserve`` -> ``connect ‖ connect`` with the producer's hello
carried by its connect (two round trips), or ``reserve ‖ reserve`` -> ``wait_hello`` ->
``connect ‖ connect`` when the producer's controller says hello itself; both ends
released on any failure. :class:`Steps` says how the
calls run: here directly, two at once on threads; in a flow, as Prefect tasks.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Annotated, ParamSpec, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    validate_call,
)

from scistream_gateway.errors import BadFormat, ServerError, Timeout
from scistream_gateway.protocol import (
    MAX_NUM_CONN,
    MAX_RATE_KBPS,
    MAX_WAIT_HELLO_S,
    ConnectReply,
    GatewayInfoReply,
    HelloReply,
    ReleaseReply,
    RenewReply,
    Reply,
    ReserveReply,
    State,
    StatusReply,
    WaitHelloReply,
    is_canonical_uid,
    parse_address,
)

__all__ = [
    "Addresses", "LeaseS", "NumConn", "PollS", "Rate", "StreamHandle", "Steps", "WaitS",
    "check_gateway", "check_setup", "checked", "connect", "gateway_info", "hello",
    "key_and_uid", "list_streams", "open_ends", "poll_hello", "release", "release_both",
    "renew", "reserve", "status", "wait_hello",
]


class StreamHandle(BaseModel):
    """An open stream: where the consumer app connects, and what identifies it.

    It never holds the hello key: a handle is a flow's result, which Prefect may
    persist (pickled, in clear) in its result storage.
    """

    model_config = ConfigDict(defer_build=True)  # built on first use, not by `status`

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
    setup_round_trips: int = Field(
        description="Sequential gateway round trips of the setup: 2 when the producer's "
        "hello rode on its connect, 3 when the flow waited for the producer's controller "
        "(wait_hello).")
    lease_expires: float = Field(
        default=0.0, description="When the earlier of the two leases runs out (Unix time), "
        "unless renewed.",
    )


def check_gateway(gateway: object, name: str = "gateway"):
    """``gateway`` if it has the gateway interface (``call`` and ``label``), else BAD_FORMAT."""
    if not callable(getattr(gateway, "call", None)) or not hasattr(gateway, "label"):
        raise BadFormat(f"{name} must be a gateway (LocalGateway, GlobusComputeGateway, "
                        f"LocalClient), not {type(gateway).__name__}")
    return gateway


def _reveal(key: SecretStr | str) -> str:
    # Keys travel as SecretStr, so no record of a task run can show them.
    value = key.get_secret_value() if isinstance(key, SecretStr) else key
    if not isinstance(value, str) or not value:
        raise BadFormat("hello_key must be a non-empty string (or SecretStr)")
    return value


def _address(text: str) -> str:
    parse_address(text, "address")  # BAD_FORMAT, as the gateway would say
    return text


MAX_LEASE_S = 30 * 86400  # a month; each gateway's max_lease_s bounds it further
MAX_HELLO_TIMEOUT_S = 86400.0  # a day: longer is a typo, not a wait

# The bounds of the open logic's arguments, stated once: flow parameters carry them (so
# a deployment's form refuses a bad value before a run starts), and :func:`checked`
# holds plain Python callers to them.
NumConn = Annotated[int, Field(strict=True, ge=1, le=MAX_NUM_CONN,
                               description="Parallel connections.")]
Rate = Annotated[int, Field(strict=True, ge=0, le=MAX_RATE_KBPS,
                            description="Rate limit in kbit/s (0: unlimited).")]
LeaseS = Annotated[int, Field(strict=True, ge=1, le=MAX_LEASE_S,
                              description="Lease in seconds (the gateway's own maximum "
                              "bounds it further).")]
WaitS = Annotated[float, Field(strict=True, ge=0, le=MAX_HELLO_TIMEOUT_S, allow_inf_nan=False,
                               description="Seconds to wait for the producer's hello.")]
PollS = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False,
                               description="Seconds of one long-poll (at most 20 s, the "
                               "gateway's bound).")]
Addresses = Annotated[list[Annotated[str, AfterValidator(_address)]],
                      Field(min_length=1, max_length=MAX_NUM_CONN,
                            description="'host:port' strings ('[addr]:port' for IPv6).")]


P = ParamSpec("P")
R = TypeVar("R")
ReplyT = TypeVar("ReplyT", bound=Reply)


def checked(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` with its arguments held to their annotations (the bounds above): a
    bad one is ``BAD_FORMAT``, naming the argument, never echoing its value."""
    # The validator is built on the first call, not at import: building the four of
    # this module cost a one-shot `scistream status`, which calls none of them, 20 ms.
    validated = None
    names = list(inspect.signature(function).parameters)

    @functools.wraps(function)
    def call(*args, **kwargs):
        nonlocal validated
        if validated is None:  # two threads may both build it: the same, harmlessly
            validated = validate_call(config=ConfigDict(arbitrary_types_allowed=True,
                                                        strict=True))(function)
        try:
            return validated(*args, **kwargs)
        except ValidationError as exc:
            if exc.title != function.__name__:  # raised inside, not about the arguments
                raise
            error = exc.errors()[0]
            # A positional argument's location is its index.
            where = ".".join(names[part] if i == 0 and isinstance(part, int) else str(part)
                             for i, part in enumerate(error["loc"]))
            raise BadFormat(f"{where}: {error['msg']}") from None

    return call


def _call(gateway, function: str, request: dict, model: type[ReplyT]) -> ReplyT:
    """``function`` on ``gateway``, its reply as the wire model ``model``. Fields this
    client does not know (a newer gateway's) are left out; a reply that is not the
    model is ``SERVER_ERR``."""
    reply = check_gateway(gateway).call(function, request)
    try:
        return model.model_validate({k: v for k, v in reply.items()
                                     if k in model.model_fields})
    except ValidationError as exc:
        fields = sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})
        raise ServerError(f"the {function} reply of {gateway.label} is malformed (fields "
                          f"{fields}): is it another version of scistream?") from None


def gateway_info(gateway) -> GatewayInfoReply:
    """Name, version, backends, addresses, free ports and active streams of a gateway."""
    return _call(gateway, "gateway_info", {}, GatewayInfoReply)


def reserve(gateway, uid: str, role: str, num_conn: int, hello_key: SecretStr | str,
            rate: int = 0, lease_s: int | None = None) -> ReserveReply:
    """``reserve`` on one gateway; only the hello key's SHA-256 is sent."""
    request = {"uid": uid, "role": role, "num_conn": num_conn, "rate": rate,
               "key_sha256": hashlib.sha256(_reveal(hello_key).encode()).hexdigest()}
    if lease_s is not None:
        request["lease_s"] = lease_s
    return _call(gateway, "reserve", request, ReserveReply)


@checked
def hello(gateway, uid: str, hello_key: SecretStr | str, role: str,
          app_listeners: Addresses | None = None) -> HelloReply:
    """An app controller's ``hello``; the producer gives where its app listens."""
    request = {"uid": uid, "key": _reveal(hello_key), "role": role}
    if app_listeners is not None:
        request["app_listeners"] = app_listeners
    return _call(gateway, "hello", request, HelloReply)


@checked
def wait_hello(gateway, uid: str, max_wait_seconds: WaitS = 300.0,
               poll_frequency_seconds: PollS = 10.0) -> list[str]:
    """Long-poll ``wait_hello`` until the producer's hello; its ``app_listeners``."""
    deadline = time.monotonic() + max_wait_seconds
    while (app_listeners := poll_hello(gateway, uid, poll_frequency_seconds,
                                       deadline)) is None:
        pass
    return app_listeners


def poll_hello(gateway, uid: str, poll_frequency_seconds: float,
               deadline: float) -> list[str] | None:
    """One long-poll of ``wait_hello``, ending by ``deadline`` (``time.monotonic``): the
    producer's ``app_listeners``, or None if it has not said hello yet; ``TIMEOUT`` when
    the deadline has passed without a hello."""
    remaining = deadline - time.monotonic()
    timeout_s = max(0.0, min(poll_frequency_seconds, remaining, MAX_WAIT_HELLO_S))
    reply = _call(gateway, "wait_hello", {"uid": uid, "timeout_s": timeout_s}, WaitHelloReply)
    if reply.state != State.RESERVED:
        return reply.app_listeners
    if time.monotonic() >= deadline:
        raise Timeout(f"no hello for stream {uid} within the time given")
    return None


@checked
def connect(gateway, uid: str, remote_listeners: Addresses, peer_fingerprint: str | None,
            peer_certificate: str | None, tls: bool = True,
            hello_key: SecretStr | str | None = None,
            app_listeners: Addresses | None = None) -> ConnectReply:
    """``connect`` one end to its peer's listeners, pinning the peer's certificate. The
    producer's connect may carry its hello (``hello_key`` and ``app_listeners``, both or
    neither): one round trip instead of two."""
    request: dict = {"uid": uid, "remote_listeners": remote_listeners, "tls": tls}
    if tls:
        request.update(peer_fingerprint=peer_fingerprint, peer_certificate=peer_certificate)
    if (hello_key is None) != (app_listeners is None):
        raise BadFormat("a hello carried by connect gives both hello_key and app_listeners")
    if app_listeners is not None:
        request["hello"] = {"key": _reveal(hello_key), "app_listeners": app_listeners}
    return _call(gateway, "connect", request, ConnectReply)


def status(gateway, uid: str) -> StatusReply:
    """``status`` of one end: state, proxy liveness, byte counters, lease."""
    return _call(gateway, "status", {"uid": uid}, StatusReply)


def renew(gateway, uid: str, lease_s: int | None = None) -> float:
    """``renew`` one end's lease; the new expiry (Unix time)."""
    request: dict = {"uid": uid}
    if lease_s is not None:
        request["lease_s"] = lease_s
    return _call(gateway, "renew", request, RenewReply).lease_expires


def release(gateway, uid: str) -> bool:
    """``release`` one end (idempotent): True, also when it was already gone."""
    return _call(gateway, "release", {"uid": uid}, ReleaseReply).released


def list_streams(gateway) -> list[dict]:
    """The caller's streams on one gateway: ``uid, role, state, created, lease_expires,
    bytes`` each (the gateway knows the caller by the proofs every request carries)."""
    return check_gateway(gateway).call("list_streams", {})["streams"]


def key_and_uid(uid: str | None, hello_key: SecretStr | str | None,
                app_listeners: list[str] | None) -> tuple[str, SecretStr]:
    """The stream's uid and hello key: given, or new (a uuid4, 32 random bytes)."""
    if app_listeners is None and (uid is None or hello_key is None):
        raise BadFormat("give app_listeners (the producer's connect carries its hello), or the "
                        "uid and hello key the producer's controller will use for its own hello")
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


@checked
def check_setup(producer: object, consumer: object, num_conn: NumConn, rate: Rate,
                app_listeners: Addresses | None, tls: bool, lease_s: LeaseS | None,
                hello_timeout_s: WaitS) -> None:
    """Refuse a malformed request before anything is reserved (``BAD_FORMAT``): the
    numbers and addresses by their bounds, the gateways by their interface."""
    check_gateway(producer, "producer")
    check_gateway(consumer, "consumer")


def _both(first: Callable[[], object], second: Callable[[], object]) -> tuple:
    """Run two calls at once; raise the first one's failure after both ended."""
    pool = ThreadPoolExecutor(2)
    try:
        futures = [pool.submit(first), pool.submit(second)]
        wait(futures)
        return tuple(f.result() for f in futures)
    finally:
        pool.shutdown(wait=False)


def release_both(producer, consumer, uid: str) -> tuple[bool, bool]:
    """Release both ends at once (idempotent); raise the first failure after both ran."""
    return _both(lambda: release(producer, uid), lambda: release(consumer, uid))


class Steps:
    """How :func:`open_ends` runs its gateway calls: here, directly, two at once on
    threads. The flows' subclass runs each as a Prefect task."""

    def one(self, step: Callable, *args, **kwargs):
        """Run one call, ``step`` being one of this module's call functions."""
        return step(*args, **kwargs)

    def both(self, step: Callable, first: tuple[tuple, dict],
             second: tuple[tuple, dict]) -> tuple:
        """Run ``step`` twice at once, as ``(args, kwargs)`` say; raise the first failure
        after both ended."""
        return _both(lambda: step(*first[0], **first[1]), lambda: step(*second[0], **second[1]))

    def teardown(self, producer, consumer, uid: str) -> None:
        """Release both ends after a failed setup."""
        release_both(producer, consumer, uid)

    def teardown_failed(self, uid: str) -> None:
        """Say that releasing after a failed setup failed (the current exception)."""
        logging.getLogger("scistream_prefect").exception(
            "releasing stream %s after a failed setup failed; the lease expiry will", uid)


def open_ends(producer, consumer, *, uid: str, hello_key: SecretStr, num_conn: int = 4,
              rate: int = 0, app_listeners: list[str] | None = None, tls: bool = True,
              lease_s: int | None = None, hello_timeout_s: float = 300.0,
              steps: Steps | None = None) -> StreamHandle:
    """Reserve both ends, then connect both ends, the producer's carrying its hello
    when ``app_listeners`` are given (else the hello is waited for in between);
    on any failure (Ctrl-C too) release both and raise it. Arguments are checked by
    :func:`check_setup` and :func:`key_and_uid` first."""
    steps = steps or Steps()
    started = time.perf_counter()
    common = {"uid": uid, "num_conn": num_conn, "hello_key": hello_key, "rate": rate,
              "lease_s": lease_s}
    try:
        prod, cons = steps.both(reserve, ((producer,), {"role": "PROD", **common}),
                                ((consumer,), {"role": "CONS", **common}))
        if app_listeners is not None:
            # The flow is the producer's controller: its hello rides on the connect.
            app = [str(a) for a in app_listeners]
            folded = {"hello_key": hello_key, "app_listeners": app}
            round_trips = 2
        else:
            app = steps.one(wait_hello, producer, uid, max_wait_seconds=hello_timeout_s)
            folded, round_trips = {}, 3
        steps.both(connect,
                   ((producer, uid, cons.listeners, cons.cert_fingerprint,
                     cons.certificate), {"tls": tls, **folded}),
                   ((consumer, uid, prod.listeners, prod.cert_fingerprint,
                     prod.certificate), {"tls": tls}))
    except BaseException:
        try:
            steps.teardown(producer, consumer, uid)
        except BaseException:  # noqa: BLE001 - the original failure is the one to raise
            steps.teardown_failed(uid)
        raise
    return StreamHandle(
        uid=uid, producer=producer.label, consumer=consumer.label, num_conn=num_conn,
        listeners=cons.listeners, producer_listeners=prod.listeners, app_listeners=app,
        tls=tls, producer_fingerprint=prod.cert_fingerprint,
        consumer_fingerprint=cons.cert_fingerprint,
        setup_s=time.perf_counter() - started, setup_round_trips=round_trips,
        lease_expires=min(prod.lease_expires, cons.lease_expires),
    )
