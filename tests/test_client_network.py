"""No test reaches the network: the guard conftest installs holds for every kind of call."""

from __future__ import annotations

import socket

import pytest

from netguard import NetworkBlocked


@pytest.mark.parametrize("address", [("192.0.2.1", 443), ("10.0.0.1", 80), ("2001:db8::1", 443)])
def test_non_loopback_connections_are_refused(address):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(NetworkBlocked):
            sock.connect(address)
        with pytest.raises(NetworkBlocked):
            sock.connect_ex(address)


def test_remote_names_are_not_resolved():
    with pytest.raises(NetworkBlocked):
        socket.getaddrinfo("auth.globus.org", 443)
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("compute.api.globus.org", 443), timeout=1)


@pytest.mark.slow  # globus-sdk retries with back-off: about 16 s
def test_the_globus_sdk_itself_cannot_reach_globus():
    """Without a registered response, a real globus-sdk call fails here, offline."""
    import globus_sdk

    client = globus_sdk.AuthClient()
    with pytest.raises(globus_sdk.GlobusConnectionError):
        client.get_openid_configuration()


def test_loopback_still_works():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_subprocesses_are_guarded_too():
    import subprocess
    import sys

    code = ("import socket\n"
            "try:\n"
            "    socket.create_connection(('192.0.2.1', 443), timeout=1)\n"
            "except OSError as exc:\n"
            "    print(type(exc).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "NetworkBlocked", proc.stderr[-2000:]
