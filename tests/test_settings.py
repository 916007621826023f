"""Gateway settings files and the address checks everything else relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from scistream_gateway.errors import BadFormat, ServerError
from scistream_gateway.settings import GatewaySettings
from scistream_gateway.protocol import parse_address


def test_settings_round_trip_through_toml(tmp_path: Path):
    settings = GatewaySettings(name='gw "quoted"\nname', state_dir=tmp_path / "state",
                               wan_address="gw.example.org", port_min=50100, port_max=50199,
                               rate_capacity=10_000_000)
    path = tmp_path / "gateway.toml"
    path.write_text(settings.to_toml())
    assert GatewaySettings.from_toml(path) == settings


@pytest.mark.parametrize("body, complaint", [
    ('name = "x"', "state_dir"),
    ('name = "x"\nstate_dir = "/s"\nport_range = [1000, 2000]', "port_range"),
    ('name = "x"\nstate_dir = "/s"\nlan_address = "10.0.0.1; rm -rf /"', "lan_address"),
    ('name = "x"\nstate_dir = "/s"\nmax_num_conn = 0', "max_num_conn"),
    ('name = "x"\nstate_dir = "/s"\nlisten_anywhere = true', "unknown keys"),
])
def test_bad_settings_name_the_problem(tmp_path: Path, body: str, complaint: str):
    path = tmp_path / "gateway.toml"
    path.write_text("[gateway]\n" + body + "\n")
    with pytest.raises(ServerError, match=complaint):
        GatewaySettings.from_toml(path)


@pytest.mark.parametrize("text, parsed", [
    ("127.0.0.1:5000", ("127.0.0.1", 5000)),
    ("[::1]:5000", ("::1", 5000)),
    ("gw-1.example.org:65535", ("gw-1.example.org", 65535)),
])
def test_addresses_accepted(text, parsed):
    assert parse_address(text, "x") == parsed


@pytest.mark.parametrize("text", [
    "127.0.0.1", ":80", "host:", "host:0", "host:+80", "host:８０", "bad_host:80",
    "-lead.example:80", "h\r\n:80", "[gw.example.org]:80", "1.2.3.4:80 ", None,
])
def test_addresses_refused(text):
    with pytest.raises(BadFormat):
        parse_address(text, "x")


def test_the_shipped_example_is_valid():
    example = Path(__file__).parent.parent / "endpoint_configs" / "gateway.example.toml"
    settings = GatewaySettings.from_toml(example)
    assert settings.backend == "native" and settings.port_min == 50000
