"""IPv6 between the gateways (issue 18, item 6): gateways whose addresses are IPv6
literals write their listeners ``[::1]:port``, and a real stream with TLS crosses
``::1`` through the native relay and the external backends."""

from __future__ import annotations

import pytest

from scistream_gateway.errors import BadFormat
from scistream_gateway.protocol import parse_address
from scistream_prefect import LocalPair
from scistream_prefect import streams_core as core
from scistream_proxy import addresses, apps
from scistream_proxy.external import _stunnel_address

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


def test_every_parser_reads_and_writes_ipv6_listeners():
    listener = "[2001:db8::1]:5000"
    assert parse_address(listener, "x") == ("2001:db8::1", 5000)  # the wire models
    assert addresses.parse_address(listener) == ("2001:db8::1", 5000)  # the proxies
    assert addresses.format_address("2001:db8::1", 5000) == listener
    core.check_setup(_Gw(), _Gw(), 1, 0, [listener], True,
                     None, 1.0)
    for bad in ("2001:db8::1:5000", "[2001:db8::1]", "[gw.example.org]:5000"):
        with pytest.raises(BadFormat):
            parse_address(bad, "x")
        with pytest.raises(BadFormat):
            core.check_setup(_Gw(), _Gw(), 1, 0, [bad], True,
                             None, 1.0)
    assert _stunnel_address(listener) == "2001:db8::1:5000"  # stunnel splits at the last ':'


class _Gw:
    label = "x"

    def call(self, function, request, timeout_s=None):
        raise AssertionError("no call: the arguments are checked first")


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
