"""A socket guard: connections from the test process go to loopback or nowhere.

Installed by conftest for the whole session, and by ``netguard_site/sitecustomize.py``
in every Python subprocess the tests start, so a test that would reach the Globus cloud
(or anything beyond this machine) fails with :class:`NetworkBlocked` instead of
depending on the network. ``tests/test_client_network.py`` proves it holds.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["NetworkBlocked", "install"]


class NetworkBlocked(OSError):
    """A test tried to reach a non-loopback address."""


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo


def _loopback_host(host: object) -> bool:
    if not isinstance(host, str):
        return False
    if host in ("localhost", "localhost.localdomain", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(sock: socket.socket, address: object) -> None:
    if sock.family == socket.AF_UNIX:
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not _loopback_host(host):
        raise NetworkBlocked(f"test tried to reach {address!r}: only loopback is allowed")


def _connect(self, address):
    _check(self, address)
    return _real_connect(self, address)


def _connect_ex(self, address):
    _check(self, address)
    return _real_connect_ex(self, address)


def _sendto(self, data, *args):
    _check(self, args[-1])
    return _real_sendto(self, data, *args)


def _getaddrinfo(host, *args, **kwargs):
    # Resolving a remote name is already reaching out (DNS); numeric and local names pass.
    if host is not None and not _loopback_host(host if isinstance(host, str) else
                                               host.decode()):
        raise NetworkBlocked(f"test tried to resolve {host!r}: only loopback is allowed")
    return _real_getaddrinfo(host, *args, **kwargs)


def install() -> None:
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
    socket.socket.sendto = _sendto
    socket.getaddrinfo = _getaddrinfo
