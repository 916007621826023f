"""A gateway behind a Globus Compute endpoint: the production side of the gateway seam.

Calls go through :class:`globus_compute_sdk.Executor` with the Globus app of
:mod:`scistream_prefect.auth`. The Executor (its threads, its AMQP result channel, its
tokens) is made inside the process that calls, once per process and block, and is never
a task parameter: a block is plain data that pickles and serializes as JSON.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
import uuid
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from scistream_gateway.errors import (
    AuthError,
    BadFormat,
    SciStreamError,
    ServerError,
    Timeout,
    Unavailable,
    error_from_wire,
)

__all__ = ["EndpointOffline", "GlobusComputeGateway", "calls_given_up"]

_EXECUTORS: dict[tuple, Any] = {}
_EXECUTORS_LOCK = threading.Lock()
_GIVEN_UP = threading.Event()


def calls_given_up() -> bool:
    """Whether this process gave up waiting for a gateway call (its endpoint offline,
    or the call timed out).

    Such a call stays queued at Globus Compute, and the SDK's exit waits for the result
    of every task it submitted: the process would not end until the endpoint is back. A
    process that must end now does its own cleanup, then ``os._exit`` (the
    ``scistream`` command does).
    """
    return _GIVEN_UP.is_set()


class EndpointOffline(Unavailable):
    """``UNAVAILABLE`` because Globus Compute reports the endpoint offline: the call
    stays queued at the service until the endpoint is back, so calling again at once
    gains nothing (the read-only tasks do not retry it)."""


class GlobusComputeGateway(Block):
    """A SciStream gateway whose functions run on a Globus Compute endpoint.

    The gateway node's operator installs ``scistream-prefect[gateway]`` next to the
    endpoint, registers the gateway functions once (``scistream-gateway register``
    prints a JSON object mapping each function name to its UUID) and puts those UUIDs
    in the endpoint's ``allowed_functions``. Give that object as ``function_ids``;
    without it each function is submitted by value (registered on first use), which an
    endpoint with ``allowed_functions`` refuses.

    Authentication: the user's ``scistream login``, or a confidential client from the
    :class:`~scistream_prefect.auth.GlobusCredentials` block named by
    ``credentials_block`` (or the environment) for headless runs.

    Example:
        ```python
        from prefect import flow
        from scistream_prefect import GlobusComputeGateway, get_gateway_info

        @flow
        def inspect_endpoint():
            gw = GlobusComputeGateway.load("facility-p")  # saved once with .save(...)
            return get_gateway_info(gw)
        ```
    """

    _block_type_name = "SciStream Globus Compute Gateway"
    _description = "A SciStream gateway whose functions run on a Globus Compute endpoint."
    _logo_url = "https://github.com/scistream.png"  # the SciStream organisation's avatar
    _documentation_url = "https://scistream.readthedocs.io/en/latest/"

    endpoint_id: uuid.UUID = Field(
        description="UUID of the gateway node's Globus Compute endpoint.",
    )
    display_name: str = Field(
        default="", description="A name for people (Prefect UI, logs); defaults to the "
        "endpoint id.",
    )
    function_ids: dict[str, uuid.UUID] | None = Field(
        default=None,
        description="Registered function UUIDs by gateway function name (gateway_info, "
        "reserve, hello, wait_hello, connect, status, renew, release, list_streams), as "
        "printed by "
        "`scistream-gateway register`. Missing: functions are submitted by value.",
    )
    credentials_block: str | None = Field(
        default=None,
        description="Name of a saved GlobusCredentials block to authenticate with "
        "(headless runs). Missing: the environment's client credentials, else the "
        "user's `scistream login`.",
    )
    call_timeout_s: float = Field(
        default=300.0, gt=0,
        description="Seconds to wait for one function's result (queueing on the "
        "endpoint included) before it is a TIMEOUT.",
    )
    offline_check_s: float = Field(
        default=5.0, gt=0,
        description="Seconds to wait for a result before asking Globus Compute once "
        "whether the endpoint is online (an offline one is UNAVAILABLE then, not a "
        "TIMEOUT at call_timeout_s). Calls answered sooner make no such request.",
    )

    @field_validator("function_ids")
    @classmethod
    def _known_functions(cls, value: dict[str, uuid.UUID] | None):
        from scistream_gateway.protocol import FUNCTIONS

        unknown = sorted(set(value or {}) - set(FUNCTIONS))
        if unknown:
            raise ValueError(f"unknown gateway functions {unknown}; known: {sorted(FUNCTIONS)}")
        return value

    @classmethod
    def from_registration(cls, endpoint_id: uuid.UUID | str, registration: str | os.PathLike,
                          **fields: Any) -> GlobusComputeGateway:
        """A block whose ``function_ids`` come from the JSON file ``scistream-gateway
        register`` wrote (one flat object: function name -> UUID).

        Raises:
            BadFormat: the file cannot be read or is not such an object.
        """
        import json

        try:
            with open(registration) as fh:
                function_ids = json.load(fh)
        except (OSError, ValueError) as exc:
            raise BadFormat(f"cannot read function ids from {registration}: {exc}") from None
        if not isinstance(function_ids, dict):
            raise BadFormat(f"{registration} holds {type(function_ids).__name__}, not an "
                            "object of function name -> UUID")
        try:
            return cls(endpoint_id=endpoint_id, function_ids=function_ids, **fields)
        except ValueError as exc:
            raise BadFormat(f"{registration}: {exc}") from None

    @property
    def label(self) -> str:
        return f"compute:{self.display_name or self.endpoint_id}"

    def _executor(self, stale=None):
        """This process's Executor for the block; a new one in place of ``stale``."""
        key = (os.getpid(), str(self.endpoint_id), self.credentials_block)
        with _EXECUTORS_LOCK:
            executor = _EXECUTORS.get(key)
            if executor is not None and executor is stale:
                executor.shutdown(wait=False, cancel_futures=True)
                executor = None
            if executor is None:
                from globus_compute_sdk import Client, Executor

                from scistream_gateway.local_worker import strategies
                from scistream_prefect.auth import make_app

                client = Client(
                    app=make_app(self.credentials_block),
                    **strategies(),  # the same as LocalGateway's and registration's
                    do_version_check=False,  # one round trip fewer; results carry versions
                )
                executor = _EXECUTORS[key] = Executor(
                    endpoint_id=self.endpoint_id, client=client,
                    # The SDK's default pacing (4 free submits per 16 s, then about 4 s
                    # between submits) suits bulk work in batches; a control plane
                    # submits single calls in sequence: from the 5th call on one
                    # gateway within 16 s (a pipeline's second stream), each waited
                    # 3.3-4.2 s. The widest the SDK allows: 8 submits per second.
                    api_burst_limit=8, api_burst_window_s=1)
            return executor

    def submit(self, function: str, request: dict) -> concurrent.futures.Future:
        """Submit one gateway function call, with this client's proofs of ownership
        added (:func:`~scistream_prefect.ownership.with_proofs`); the future's result is
        the raw reply."""
        from scistream_gateway.functions import ALL
        from scistream_gateway.protocol import FUNCTIONS
        from scistream_prefect.ownership import with_proofs

        if function not in FUNCTIONS:
            raise BadFormat(f"no gateway function {function!r}; known: {sorted(FUNCTIONS)}")
        request = with_proofs(function, request)
        function_id = (self.function_ids or {}).get(function)

        def submit_to(executor):
            if function_id is not None:
                return executor.submit_to_registered_function(str(function_id),
                                                              args=(request,))
            return executor.submit(ALL[function], request)

        executor = self._executor()
        try:
            try:
                return submit_to(executor)
            except RuntimeError:
                # A refused batch stops an Executor for good; it then refuses every submit
                # with RuntimeError (concurrent.futures' contract after shutdown). One new
                # Executor, so one 403 does not poison the process's later calls.
                return submit_to(self._executor(stale=executor))
        except Exception as exc:  # noqa: BLE001 - mapped to a code below
            raise _mapped(exc, function, self.label) from None

    def reply(self, function: str, future: concurrent.futures.Future,
              timeout_s: float | None = None) -> dict:
        """Wait for a submitted call; raise its SciStream error, if any.

        A call not answered within ``offline_check_s`` asks the web service once for
        the endpoint's status: :class:`EndpointOffline` (``UNAVAILABLE``) if it is
        offline, else (online, or the status request itself failed) the wait goes on
        to the timeout (``Timeout``).
        """
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            reply = self._wait(function, future, timeout)
        except concurrent.futures.TimeoutError:
            # The future is left as it is, not cancelled: the task stays queued at the
            # service all the same, and the SDK's result watcher, failing its open futures
            # on its way out, raises on a cancelled one before it signals that none is
            # left, so the process's exit then waits forever (globus-compute-sdk 4.19).
            _GIVEN_UP.set()
            raise Timeout(f"{function} on {self.label} did not finish in {timeout} s") from None
        except EndpointOffline:
            _GIVEN_UP.set()  # its future is left as it is too
            raise
        except SciStreamError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a code below
            raise _mapped(exc, function, self.label) from None
        error = error_from_wire(reply)
        if error is not None:
            raise error
        if not isinstance(reply, dict):
            raise ServerError(f"{function} on {self.label} returned {type(reply).__name__}, "
                              "not a JSON object")
        return reply

    def _wait(self, function: str, future: concurrent.futures.Future, timeout: float):
        """The future's result within ``timeout``, failing early if the endpoint is
        offline (a stopped endpoint never answers; its task waits at the service)."""
        first = min(self.offline_check_s, timeout)
        try:
            return future.result(timeout=first)
        except concurrent.futures.TimeoutError:
            pass
        started, left = time.monotonic(), timeout - first
        # The status request runs beside the wait: it is only a hint, and the SDK
        # retries a failing service for about 16 s, while the result may come first.
        hint = _in_thread(self._endpoint_status)
        concurrent.futures.wait([future, hint], timeout=left,
                                return_when=concurrent.futures.FIRST_COMPLETED)
        if not future.done() and hint.done() and hint.exception() is None \
                and hint.result().get("status") == "offline":
            raise EndpointOffline(f"{function} on {self.label}: endpoint {self.endpoint_id} "
                                  "is offline (Globus Compute has no heartbeat from it); "
                                  "the call stays queued there until the endpoint is back")
        return future.result(timeout=max(0.0, left - (time.monotonic() - started)))

    def _endpoint_status(self) -> dict:
        # The Executor's own Client: the same app and tokens as the submission.
        status = self._executor().client.get_endpoint_status(str(self.endpoint_id))
        return status if isinstance(status, dict) else {}

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict:
        """Run gateway function ``function`` on ``request`` at the endpoint."""
        return self.reply(function, self.submit(function, request), timeout_s)


def _in_thread(fn) -> concurrent.futures.Future:
    """``fn()`` in a daemon thread (nothing waits for it at exit), as a future."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            done.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
            done.set_exception(exc)

    threading.Thread(target=run, name="scistream-endpoint-status", daemon=True).start()
    return done


def _mapped(exc: BaseException, function: str, label: str) -> Exception:
    """A Globus or Compute failure as the SciStream error a caller catches."""
    from globus_compute_sdk.errors import TaskExecutionFailed
    from globus_sdk import GlobusAPIError, GlobusConnectionError
    from globus_sdk.token_storage import TokenValidationError

    where = f"{function} on {label}"
    if isinstance(exc, TokenValidationError):
        return AuthError(f"{where}: not logged in to Globus ({exc}); run `scistream login`, "
                         "or give the gateway a GlobusCredentials block")
    if isinstance(exc, GlobusAPIError):
        if exc.http_status in (401, 403):
            return AuthError(f"{where}: Globus refused ({exc.http_status} {exc.code}): "
                             f"{exc.message}")
        if exc.http_status == 404:
            return Unavailable(f"{where}: no such endpoint or function ({exc.message})")
        return Unavailable(f"{where}: Globus Compute answered {exc.http_status}: "
                           f"{exc.message}")
    if isinstance(exc, GlobusConnectionError | ConnectionError | OSError):
        return Unavailable(f"{where}: Globus Compute unreachable: {exc}")
    if isinstance(exc, TaskExecutionFailed):
        return ServerError(f"{where} failed on the endpoint: {str(exc).strip()[-500:]}")
    if isinstance(exc, concurrent.futures.CancelledError):
        return Unavailable(f"{where} was cancelled (executor shut down)")
    return ServerError(f"{where}: {type(exc).__name__}: {exc}")


def shutdown_executors(wait: bool = False, timeout_s: float = 30.0) -> bool:
    """Stop this process's Executors (their threads and result channels).

    With ``wait``, their submitted calls get up to ``timeout_s`` in all to finish. The
    SDK's own wait has no bound, and a call queued at an endpoint that never comes back
    never finishes: the Executors left waiting then stop in the background. Returns
    whether every Executor stopped in time.
    """
    with _EXECUTORS_LOCK:
        executors = [e for (pid, *_), e in _EXECUTORS.items() if pid == os.getpid()]
        _EXECUTORS.clear()
    if not wait:
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)
        return True
    stoppers = [threading.Thread(target=executor.shutdown, daemon=True,
                                 kwargs={"wait": True, "cancel_futures": True},
                                 name="scistream-executor-shutdown")
                for executor in executors]
    for stopper in stoppers:
        stopper.start()
    deadline = time.monotonic() + timeout_s
    for stopper in stoppers:
        stopper.join(max(0.0, deadline - time.monotonic()))
    waiting = sum(stopper.is_alive() for stopper in stoppers)
    if waiting:
        import logging

        logging.getLogger(__name__).warning(
            "%d Globus Compute Executor(s) still wait for results after %s s; they stop "
            "in the background", waiting, timeout_s)
    return not waiting
