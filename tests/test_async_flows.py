"""The task library in async flows (scistream_prefect.tasks.aio): a stream opened and
released, and a hello wait that leaves the flow's event loop free; on real local
gateways and Prefect's harness."""

from __future__ import annotations

import asyncio
import secrets
import uuid

from prefect import flow

from scistream_gateway.protocol import State, StatusReply
from scistream_prefect.tasks import aio

from conftest import run_consumer


def _active(*gateways) -> list[int]:
    return [gw.call("gateway_info", {})["active_streams"] for gw in gateways]


def test_an_async_flow_opens_moves_data_and_releases(gateways, producer_app):
    producer, consumer = gateways
    app = producer_app(2, 1 << 20)
    seen: dict = {}

    uid, key = str(uuid.uuid4()), secrets.token_urlsafe(32)

    @flow
    async def pipeline():
        p, c = await asyncio.gather(aio.reserve_gateway_ports(producer, uid, "PROD", 2, key),
                                    aio.reserve_gateway_ports(consumer, uid, "CONS", 2, key))
        await aio.send_app_hello(producer, uid, key, "PROD", app.listeners)
        await asyncio.gather(
            aio.connect_gateway_proxy(producer, uid, c.listeners, c.cert_fingerprint,
                                      c.certificate),
            aio.connect_gateway_proxy(consumer, uid, p.listeners, p.cert_fingerprint,
                                      p.certificate))
        seen["active"] = _active(producer, consumer)
        seen["status"] = await aio.get_stream_status(consumer, uid)
        seen["consumer"] = await asyncio.to_thread(run_consumer, c.listeners)
        await aio.renew_stream_lease(consumer, uid, 60)
        released = await asyncio.gather(aio.release_gateway_stream(producer, uid),
                                        aio.release_gateway_stream(consumer, uid))
        return released

    assert asyncio.run(pipeline()) == [True, True]
    assert seen["active"] == [1, 1]
    assert isinstance(seen["status"], StatusReply) and seen["status"].state == State.CONNECTED
    code, received = seen["consumer"]
    assert code == 0 and sum(r["bytes"] for r in received) == 1 << 20
    assert sorted(r["bytes"] for r in app.result()) == [1 << 19, 1 << 19]
    assert _active(producer, consumer) == [0, 0]


def test_the_hello_wait_leaves_the_event_loop_free(gateways):
    """Reserve ‖ reserve with the async tasks, then wait for the producer's hello while
    two other coroutines run: a 50 ms ticker, and the producer's controller, which says
    hello after 20 ticks. A blocked loop would run neither, and the wait would end in
    TIMEOUT instead of the controller's app listeners."""
    producer, consumer = gateways
    uid, key = str(uuid.uuid4()), secrets.token_urlsafe(32)
    app_listeners = ["127.0.0.1:9"]
    ticks = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(1)
            await asyncio.sleep(0.05)

    async def controller() -> None:
        while len(ticks) < 20:
            await asyncio.sleep(0.05)
        await aio.send_app_hello(producer, uid, key, "PROD", app_listeners)

    @flow
    async def pipeline():
        await asyncio.gather(aio.reserve_gateway_ports(producer, uid, "PROD", 1, key),
                             aio.reserve_gateway_ports(consumer, uid, "CONS", 1, key))
        stop = asyncio.Event()
        ticking = asyncio.create_task(ticker(stop))
        try:
            got, _ = await asyncio.gather(
                aio.wait_for_app_hello(producer, uid, max_wait_seconds=30,
                                       poll_frequency_seconds=2),
                controller())
        finally:
            stop.set()
            await ticking
            await asyncio.gather(aio.release_gateway_stream(producer, uid),
                                 aio.release_gateway_stream(consumer, uid))
        return got

    assert asyncio.run(pipeline()) == app_listeners
    assert len(ticks) >= 20
    assert _active(producer, consumer) == [0, 0]


def test_an_async_flow_runs_the_open_and_release_flows_on_a_worker_thread(gateways,
                                                                          producer_app):
    """What docs/client.md offers an async flow for the open logic: the sync flows as
    subflows, awaited on a worker thread (their Prefect calls stay sync there)."""
    from scistream_prefect import open_stream, release_stream

    producer, consumer = gateways
    app = producer_app(1, 1024)
    seen: dict = {}

    @flow
    async def pipeline():
        handle = await asyncio.to_thread(open_stream, producer, consumer, num_conn=1,
                                         app_listeners=app.listeners)
        seen["active"] = _active(producer, consumer)
        seen["consumer"] = await asyncio.to_thread(run_consumer, handle.listeners)
        return await asyncio.to_thread(release_stream, producer, consumer, handle.uid)

    assert asyncio.run(pipeline()) is True
    assert seen["active"] == [1, 1] and seen["consumer"][0] == 0
    assert _active(producer, consumer) == [0, 0]
