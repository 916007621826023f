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
                               rate_capacity=10_000_000, shared=True,
                               docker_host="unix:///run/user/1000/docker.sock",
                               container_pids_limit=64, container_memory_mib=128)
    path = tmp_path / "gateway.toml"
    path.write_text(settings.to_toml())
    assert GatewaySettings.from_toml(path) == settings


@pytest.mark.parametrize("body, complaint", [
    ('name = "x"', "state_dir"),
    ('name = "x"\nstate_dir = "/s"\nport_range = [1000, 2000]', "port_range"),
    ('name = "x"\nstate_dir = "/s"\nlan_address = "10.0.0.1; rm -rf /"', "lan_address"),
    ('name = "x"\nstate_dir = "/s"\nmax_num_conn = 0', "max_num_conn"),
    ('name = "x"\nstate_dir = "/s"\nlisten_anywhere = true', "unknown keys"),
    ('name = "x"\nstate_dir = "/s"\ndocker_host = "tcp://10.0.0.1:2375"', "docker_host"),
    ('name = "x"\nstate_dir = "/s"\ndocker_host = "unix://docker.sock"', "docker_host"),
    ('name = "x"\nstate_dir = "/s"\nshared = "yes"', "shared must be true or false"),
    ('name = "x"\nstate_dir = "/s"\ncontainer_pids_limit = 0', "container_pids_limit"),
    ('name = "x"\nstate_dir = "/s"\ncontainer_memory_mib = 8', "container_memory_mib"),
    # Anyone who reaches the engine reads every user's keys: a shared gateway needs a
    # rootless engine named in its settings.
    ('name = "x"\nstate_dir = "/s"\nshared = true\nbackend = "nginx-docker"',
     "backend nginx-docker: a shared gateway .*docker_host"),
    ('name = "x"\nstate_dir = "/s"\nshared = true\nbackend = "haproxy-docker"',
     "backend haproxy-docker: a shared gateway .*docker_host"),
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


@pytest.mark.parametrize("body", [
    'shared = true\nbackend = "native"',
    'shared = true\nbackend = "nginx-docker"\ndocker_host = "unix:///run/user/1000/docker.sock"',
    'backend = "nginx-docker"',  # one user's gateway: DOCKER_HOST, else the standard socket
])
def test_settings_that_allow_a_backend(tmp_path: Path, body: str):
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nname = "x"\nstate_dir = "/s"\n' + body + "\n")
    GatewaySettings.from_toml(path)


def test_the_shipped_multi_user_example_is_shared():
    example = (Path(__file__).parent.parent / "endpoint_configs" / "multi_user"
               / "gateway.user.example.toml")
    settings = GatewaySettings.from_toml(example)
    assert settings.shared is True and settings.docker_host == ""
