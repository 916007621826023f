"""A whole stream through two local gateways, driven by the Prefect flows."""

from __future__ import annotations

import pytest

from scistream_prefect import open_stream, release_stream
from scistream_prefect.tasks.streams import get_stream_status

from conftest import run_consumer
from scistream_proxy.leaks import port_is_free, runs_a_proxy
from scistream_proxy.addresses import parse_address

MIB = 1 << 20
GATEWAY_SETTINGS = {"allow_plain_tcp": True}  # the ``gateways`` fixture's: the plain case


def _digests(results: list[dict]) -> list[tuple[int, str]]:
    return sorted((r["bytes"], r["sha256"]) for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-asked-by-name"])
def test_stream_carries_checksummed_data(gateways, producer_app, tls):
    producer, consumer = gateways
    num_conn = 3
    total = 256 * MIB if tls else 64 * MIB
    app = producer_app(num_conn, total)

    handle = open_stream(producer, consumer, num_conn=num_conn, app_listeners=app.listeners,
                         tls=tls)
    assert handle.tls is tls
    assert len(handle.listeners) == num_conn == len(handle.producer_listeners)
    try:
        code, received = run_consumer(handle.listeners)
        sent = app.result()
        ends = [get_stream_status.fn(gw, handle.uid) for gw in (producer, consumer)]
    finally:
        release_stream(producer, consumer, handle.uid)

    assert code == 0, received
    assert len(received) == num_conn and all(r["bytes"] > 0 for r in received)
    assert _digests(received) == _digests(sent)
    assert sum(r["bytes"] for r in received) == total
    # Both proxies moved every byte, in the right direction, over all connections.
    prod_status, cons_status = ends
    assert prod_status.state == cons_status.state == "CONNECTED"
    assert prod_status.bytes == {"from_app": total, "to_app": 0}
    assert cons_status.bytes == {"from_app": 0, "to_app": total}
    assert cons_status.connections["total"] == num_conn
    assert cons_status.connections["failed"] == 0
    # Released: processes gone, ports bindable.
    for status in ends:
        assert not runs_a_proxy(status.pid)
    for address in handle.listeners + handle.producer_listeners:
        assert port_is_free(address), address


def test_connections_round_robin_over_app_listeners(gateways, producer_app):
    """Connection i goes to app_listeners[i % n]: two producer apps, four connections."""
    producer, consumer = gateways
    apps = [producer_app(2, 4 * MIB), producer_app(2, 4 * MIB)]
    listeners = [a.listeners[0] for a in apps]
    handle = open_stream(producer, consumer, num_conn=4, app_listeners=listeners)
    try:
        code, received = run_consumer(handle.listeners)
    finally:
        release_stream(producer, consumer, handle.uid)
    assert code == 0
    assert _digests(received) == _digests(apps[0].result() + apps[1].result())



def test_a_failed_setup_releases_the_end_that_succeeded(gateway_root, producer_app):
    from conftest import make_gateway
    from scistream_prefect import NoResource

    producer = make_gateway(gateway_root, "roomy-gw")
    consumer = make_gateway(gateway_root, "tiny-gw", size=1)
    app = producer_app(2, 1024)
    with pytest.raises(NoResource, match="exhausted"):
        open_stream(producer, consumer, num_conn=2, app_listeners=app.listeners)
    for gw in (producer, consumer):
        info = gw.call("gateway_info", {})
        assert info["active_streams"] == 0
        assert list((gw.settings.state_dir / "streams").iterdir()) == []
    # gateway_root's check: no proxy process of either gateway is left.


@pytest.mark.slow
def test_status_counts_bytes_while_the_stream_runs(gateways, producer_app):
    import socket

    producer, consumer = gateways
    app = producer_app(1, 1 << 34)  # more than will be read
    handle = open_stream(producer, consumer, num_conn=1, app_listeners=app.listeners)
    try:
        with socket.create_connection(parse_address(handle.listeners[0]), timeout=30) as sock:
            read = 0
            while read < 8 * MIB:
                read += len(sock.recv(MIB))
            # Mid-transfer: both proxies already count at least what the app read.
            for gw in (consumer, producer):
                status = get_stream_status.fn(gw, handle.uid)
                assert status.connections["active"] == 1
                moved = status.bytes["to_app"] + status.bytes["from_app"]
                assert moved >= read, (gw.label, status.bytes, read)
    finally:
        release_stream(producer, consumer, handle.uid)
