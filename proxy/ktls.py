"""Kernel TLS: whether this kernel can do a TLS hop's record layer, and whether it does."""

from __future__ import annotations

import errno
import socket

# The TCP upper-layer protocol "tls" and OpenSSL's SSL_OP_ENABLE_KTLS (OpenSSL 3;
# Python 3.11's ssl has no name for it).
TCP_ULP = 31
SOL_TLS = 282
TLS_TX, TLS_RX = 1, 2
OP_ENABLE_KTLS = 0x8

_ktls: str | None | bool = False  # False: not probed yet


def ktls_available() -> str | None:
    """None if this kernel offers kernel TLS (the TCP ULP ``tls``), else what is missing.

    Probed once per process on an unconnected socket: the kernel looks the ULP up by
    name first (ENOENT: no such ULP, not built or not loadable) and only then finds the
    socket is not connected (ENOTCONN: the ULP exists).
    """
    global _ktls
    if _ktls is False:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
                _ktls = None
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    _ktls = None
                elif exc.errno == errno.ENOENT:
                    _ktls = "kernel has no tls ULP (CONFIG_TLS, module tls)"
                else:
                    _ktls = f"kernel tls ULP probe failed: {exc}"
    return _ktls  # type: ignore[return-value]


def ktls_engaged(sock: socket.socket) -> tuple[bool, bool]:
    """Whether the kernel does this connection's TLS record layer: (send, receive).

    The kernel answers the TLS_TX/TLS_RX getsockopt only once keys were installed.
    """
    engaged = []
    for direction in (TLS_TX, TLS_RX):
        try:
            socket.socket.getsockopt(sock, SOL_TLS, direction, 4)
            engaged.append(True)
        except OSError:
            engaged.append(False)
    return engaged[0], engaged[1]
