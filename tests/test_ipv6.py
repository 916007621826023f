"""IPv6 between the gateways (issue 18, item 6): gateways whose addresses are IPv6
literals write their listeners ``[::1]:port``, and a real stream with TLS crosses
``::1`` through the native relay and the external backends."""

from __future__ import annotations

import pytest

from scistream_prefect import LocalPair
from scistream_prefect import streams_core as core
from scistream_proxy import apps

from backend_chain import skip_reason
from conftest import make_gateway, run_consumer

MiB = 2**20


@pytest.fixture
def v6_app():
    started = []

    def start(connections: int, total_bytes: int):
        proc, listeners = apps.start_producer(connections, total_bytes, listen="[::1]:0")
        started.append(proc)
        return proc, listeners

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("backend", ["native", "stunnel", "haproxy", "nginx"])
def test_a_stream_with_tls_over_ipv6(gateway_root, v6_app, backend):
    if skip_reason(backend):
        pytest.skip(skip_reason(backend))
    v6 = {"lan_address": "::1", "wan_address": "::1", "backend": backend}
    producer = make_gateway(gateway_root, f"v6-prod-{backend}", size=8, **v6)
    consumer = make_gateway(gateway_root, f"v6-cons-{backend}", size=8, **v6)
    proc, app_listeners = v6_app(2, 8 * MiB)
    assert app_listeners[0].startswith("[::1]:")
    with LocalPair(producer, consumer) as pair:
        uid, key = core.key_and_uid(None, None, app_listeners)
        handle = core.open_ends(producer, consumer, uid=uid, hello_key=key, num_conn=2,
                                app_listeners=app_listeners)
        try:
            assert all(a.startswith("[::1]:") for a in handle.listeners)
            assert all(a.startswith("[::1]:") for a in handle.producer_listeners)
            code, received = run_consumer(handle.listeners)
            out, _ = proc.communicate(timeout=120)
            sent = apps.connection_results(out)
            assert code == 0, received
            assert sorted(r["sha256"] for r in received) == sorted(r["sha256"] for r in sent)
            assert sum(r["bytes"] for r in received) == 8 * MiB
        finally:
            core.release_both(producer, consumer, uid)
        assert not pair.leftovers()
