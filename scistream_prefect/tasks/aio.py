"""The task library for async flows: the same tasks, awaitable, their gateway calls on
worker threads so the flow's event loop keeps running.

A gateway call blocks (a Globus Compute round trip, a local worker's pipe), and
``wait_for_app_hello`` can wait minutes: called from an async flow, a sync task would
stop every other coroutine of the flow meanwhile. Here each call runs on a worker
thread (``asyncio.to_thread``) and the coroutine awaits it; the hello wait awaits one
bounded long-poll at a time, so a cancelled flow stops waiting at the next poll. Names,
run names, log lines and arguments are those of :mod:`scistream_prefect.tasks`; a
module rather than ``*_async`` twins, so an async flow imports one name (``aio``) and
keeps the names the docs use::

    import asyncio, secrets, uuid
    from prefect import flow
    from scistream_prefect.tasks import aio

    @flow
    async def pipeline(prod, cons, app_listeners):
        uid, key = str(uuid.uuid4()), secrets.token_urlsafe(32)
        p, c = await asyncio.gather(aio.reserve_gateway_ports(prod, uid, "PROD", 1, key),
                                    aio.reserve_gateway_ports(cons, uid, "CONS", 1, key))
        await asyncio.gather(  # the producer's connect carries its hello
            aio.connect_gateway_proxy(prod, uid, c.listeners, c.cert_fingerprint,
                                      c.certificate, hello_key=key,
                                      app_listeners=app_listeners),
            aio.connect_gateway_proxy(cons, uid, p.listeners, p.cert_fingerprint,
                                      p.certificate))
        ...  # the consumer app connects to c.listeners
        await asyncio.gather(aio.release_gateway_stream(prod, uid),
                             aio.release_gateway_stream(cons, uid))

The open logic with its release on failure (:func:`scistream_prefect.setup_stream`,
``stream_session``) stays sync: it publishes artifacts and stores records through
Prefect calls that an async flow's context turns into coroutines. An async flow awaits
the sync flows instead, as subflows on a worker thread:
``await asyncio.to_thread(open_stream, prod, cons, app_listeners=...)``.
"""

from __future__ import annotations

import asyncio
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from scistream_gateway.protocol import (
    ConnectReply,
    GatewayInfoReply,
    HelloReply,
    ReserveReply,
    StatusReply,
)
from scistream_prefect import streams_core as core
from scistream_prefect.gateways import Gateway
from scistream_prefect.streams_core import PollS, WaitS
from scistream_prefect.tasks.streams import logged_call, retry_if_transient, run_name

__all__ = [
    "connect_gateway_proxy",
    "get_gateway_info",
    "get_stream_status",
    "release_gateway_stream",
    "renew_stream_lease",
    "reserve_gateway_ports",
    "send_app_hello",
    "wait_for_app_hello",
]

_READ_ONLY = {"retries": 2, "retry_delay_seconds": 1, "retry_condition_fn": retry_if_transient}


@task(name="get-gateway-info", task_run_name=run_name("info"), cache_policy=NO_CACHE,
      **_READ_ONLY)
async def get_gateway_info(gateway: Gateway) -> GatewayInfoReply:
    """:func:`scistream_prefect.tasks.get_gateway_info`, awaitable."""
    with logged_call(gateway, "gateway_info", None):
        return await asyncio.to_thread(core.gateway_info, gateway)


@task(name="reserve-gateway-ports", task_run_name=run_name("reserve"), cache_policy=NO_CACHE)
async def reserve_gateway_ports(
    gateway: Gateway, uid: str, role: str, num_conn: int, hello_key: SecretStr | str,
    rate: int = 0, lease_s: int | None = None,
) -> ReserveReply:
    """:func:`scistream_prefect.tasks.reserve_gateway_ports`, awaitable."""
    with logged_call(gateway, "reserve", uid):
        return await asyncio.to_thread(core.reserve, gateway, uid, role, num_conn, hello_key,
                                       rate, lease_s)


@task(name="send-app-hello", task_run_name=run_name("hello"), cache_policy=NO_CACHE)
async def send_app_hello(
    gateway: Gateway, uid: str, hello_key: SecretStr | str, role: str,
    app_listeners: list[str] | None = None,
) -> HelloReply:
    """:func:`scistream_prefect.tasks.send_app_hello`, awaitable."""
    with logged_call(gateway, "hello", uid):
        return await asyncio.to_thread(core.hello, gateway, uid, hello_key, role,
                                       app_listeners)


@core.checked
def _deadline(max_wait_seconds: WaitS, poll_frequency_seconds: PollS) -> float:
    return time.monotonic() + max_wait_seconds


@task(name="wait-for-app-hello", task_run_name=run_name("wait-hello"), cache_policy=NO_CACHE)
async def wait_for_app_hello(
    gateway: Gateway, uid: str, max_wait_seconds: float = 300.0,
    poll_frequency_seconds: float = 10.0,
) -> list[str]:
    """:func:`scistream_prefect.tasks.wait_for_app_hello`, awaitable: one long-poll of
    at most ``poll_frequency_seconds`` at a time on a worker thread, the loop free."""
    with logged_call(gateway, "wait_hello", uid):
        deadline = _deadline(max_wait_seconds, poll_frequency_seconds)
        while (app_listeners := await asyncio.to_thread(
                core.poll_hello, gateway, uid, poll_frequency_seconds, deadline)) is None:
            pass
        return app_listeners


@task(name="connect-gateway-proxy", task_run_name=run_name("connect"), cache_policy=NO_CACHE)
async def connect_gateway_proxy(
    gateway: Gateway, uid: str, remote_listeners: list[str],
    peer_fingerprint: str | None, peer_certificate: str | None, tls: bool = True,
    hello_key: SecretStr | str | None = None, app_listeners: list[str] | None = None,
) -> ConnectReply:
    """:func:`scistream_prefect.tasks.connect_gateway_proxy`, awaitable."""
    with logged_call(gateway, "connect", uid):
        return await asyncio.to_thread(core.connect, gateway, uid, remote_listeners,
                                       peer_fingerprint, peer_certificate, tls, hello_key,
                                       app_listeners)


@task(name="get-stream-status", task_run_name=run_name("status"), cache_policy=NO_CACHE,
      **_READ_ONLY)
async def get_stream_status(gateway: Gateway, uid: str) -> StatusReply:
    """:func:`scistream_prefect.tasks.get_stream_status`, awaitable."""
    with logged_call(gateway, "status", uid):
        return await asyncio.to_thread(core.status, gateway, uid)


@task(name="renew-stream-lease", task_run_name=run_name("renew"), cache_policy=NO_CACHE,
      **_READ_ONLY)
async def renew_stream_lease(gateway: Gateway, uid: str, lease_s: int | None = None) -> float:
    """:func:`scistream_prefect.tasks.renew_stream_lease`, awaitable."""
    with logged_call(gateway, "renew", uid):
        return await asyncio.to_thread(core.renew, gateway, uid, lease_s)


@task(name="release-gateway-stream", task_run_name=run_name("release"), cache_policy=NO_CACHE,
      **_READ_ONLY)
async def release_gateway_stream(gateway: Gateway, uid: str) -> bool:
    """:func:`scistream_prefect.tasks.release_gateway_stream`, awaitable."""
    with logged_call(gateway, "release", uid):
        return await asyncio.to_thread(core.release, gateway, uid)
