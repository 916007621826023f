"""``host:port`` strings, as the gateways write them, to and from ``(host, port)``.

These trust their input: a request's addresses are checked (``BAD_FORMAT``) by the
gateway before they reach a proxy.
"""

from __future__ import annotations

__all__ = ["format_address", "parse_address"]


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to ``(host, port)``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: the inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
