"""A gateway behind NAT (issue 18, item 6): it binds its WAN listeners on its own
address (``wan_address``) and advertises the address peers reach
(``wan_advertise_address``). A small TCP forwarder on another loopback address stands
for the NAT: it forwards the gateway's port range, as a NAT's port forwarding does."""

from __future__ import annotations

import socket
import threading

import pytest

from scistream_gateway.errors import ServerError
from scistream_gateway.settings import GatewaySettings
from scistream_prefect import LocalPair
from scistream_prefect import streams_core as core

from conftest import make_gateway, run_consumer

MiB = 2**20
BOUND, EXPOSED = "127.0.0.3", "127.0.0.2"  # the gateway's own address, the NAT's


class PortForwarder:
    """Forwards ``EXPOSED:port`` to ``BOUND:port`` for every port of a range."""

    def __init__(self, ports: range):
        self.connections = 0
        self.lock = threading.Lock()
        self.listeners = [socket.create_server((EXPOSED, port)) for port in ports]
        for server in self.listeners:
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        port = server.getsockname()[1]
        while True:
            try:
                inside, _ = server.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.connections += 1
            outside = socket.create_connection((BOUND, port))
            for src, dst in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (src, dst):
                sock.close()

    def close(self) -> None:
        for server in self.listeners:
            server.close()


def test_the_advertise_address_defaults_to_the_wan_address_and_is_checked(tmp_path):
    settings = GatewaySettings(name="gw", state_dir=tmp_path, wan_address="192.0.2.7")
    assert settings.wan_advertise_address == "192.0.2.7"
    (tmp_path / "gw.toml").write_text(settings.to_toml())
    assert GatewaySettings.from_toml(tmp_path / "gw.toml") == settings
    nat = GatewaySettings(name="gw", state_dir=tmp_path, wan_address="10.1.2.3",
                          wan_advertise_address="2001:db8::7")
    assert (nat.wan_address, nat.wan_advertise_address) == ("10.1.2.3", "2001:db8::7")
    for bad in ("gw.example.org:5000", "[2001:db8::7]", "two words", 7):
        with pytest.raises(ServerError, match="wan_advertise_address is not a host name"):
            GatewaySettings(name="gw", state_dir=tmp_path, wan_advertise_address=bad)


def test_a_gateway_behind_nat_carries_a_stream_through_its_advertised_address(
        gateway_root, producer_app):
    producer = make_gateway(gateway_root, "nat-prod-gw", size=8, wan_address=BOUND,
                            wan_advertise_address=EXPOSED)
    consumer = make_gateway(gateway_root, "cons-gw", size=8)
    settings = producer.settings
    nat = PortForwarder(range(settings.port_min, settings.port_max + 1))
    app = producer_app(2, 8 * MiB)
    try:
        with LocalPair(producer, consumer) as pair:
            info = producer.call("gateway_info", {})
            assert (info["wan_address"], info["wan_advertise_address"]) == (BOUND, EXPOSED)
            uid, key = core.key_and_uid(None, None, app.listeners)
            handle = core.open_ends(producer, consumer, uid=uid, hello_key=key, num_conn=2,
                                    app_listeners=app.listeners)
            # Advertised: the NAT's address. Bound: the gateway's own, never the NAT's.
            assert all(a.startswith(f"{EXPOSED}:") for a in handle.producer_listeners)
            for listener in handle.producer_listeners:
                port = int(listener.rpartition(":")[2])
                with pytest.raises(OSError):
                    socket.create_server((BOUND, port)).close()
            code, received = run_consumer(handle.listeners)
            sent = app.result()
            assert code == 0, received
            assert sorted(r["sha256"] for r in received) == sorted(r["sha256"] for r in sent)
            assert sum(r["bytes"] for r in received) == 8 * MiB
            assert nat.connections == 2  # every connection crossed the NAT
            core.release_both(producer, consumer, uid)
            assert not pair.leftovers()
    finally:
        nat.close()
