"""Checks for every field a gateway function accepts; each failure is a ``BAD_FORMAT``.

Nothing from a request reaches a proxy config, a path or a process without passing
here first: uids are canonical UUIDs, addresses are ``host:port`` with a plain host
name or IP literal, numbers are bounded integers, and unknown fields are refused.
"""

from __future__ import annotations

import ipaddress
import re
import uuid

from scistream_gateway.errors import BadFormat
from scistream_proxy.addresses import format_address

__all__ = ["Request", "check_host", "format_address", "parse_address"]

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
ROLES = ("PROD", "CONS")


def check_host(host: object) -> bool:
    """True for an IP literal or a DNS host name (nothing else can reach a config)."""
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def parse_address(text: object, field: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:port"``) to ``(host, port)``."""
    if not isinstance(text, str) or len(text) > 300:
        raise BadFormat(f"{field}: expected a 'host:port' string")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise BadFormat(f"{field}: brackets are only for IPv6 addresses: {text!r}")
    elif ":" in host:
        raise BadFormat(f"{field}: write IPv6 addresses as [addr]:port: {text!r}")
    if not sep or not check_host(host):
        raise BadFormat(f"{field}: {text!r} is not 'host:port' with a host name or IP address")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadFormat(f"{field}: port of {text!r} must be 1-65535")
    return host, int(port)


class Request:
    """A request dict checked field by field; ``Request(req, required, optional)``
    refuses a non-dict, missing required fields and any field not named."""

    def __init__(self, request: object, required: tuple[str, ...], optional: tuple[str, ...] = ()):
        if not isinstance(request, dict):
            raise BadFormat(f"request must be a JSON object, got {type(request).__name__}")
        unknown = set(request) - set(required) - set(optional)
        if unknown:
            names = sorted(str(k)[:40] for k in unknown)
            raise BadFormat(f"unknown fields {names}; this function takes "
                            f"{sorted(required + optional)}")
        missing = [f for f in required if f not in request]
        if missing:
            raise BadFormat(f"missing fields {missing}")
        self.raw = request

    def has(self, field: str) -> bool:
        return field in self.raw

    def uid(self) -> str:
        value = self.raw["uid"]
        try:
            canonical = str(uuid.UUID(value)) if isinstance(value, str) else None
        except ValueError:
            canonical = None
        if canonical is None or canonical != value:
            raise BadFormat("uid must be a lowercase canonical UUID such as "
                            "'0b5c4a1e-5f8a-4c1e-9d43-2f1f6ad2c7a1'")
        return value

    def role(self) -> str:
        value = self.raw["role"]
        if value not in ROLES:
            raise BadFormat(f"role must be one of {list(ROLES)}")
        return value

    def integer(self, field: str, low: int, high: int, default: int | None = None) -> int:
        value = self.raw.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadFormat(f"{field} must be an integer in [{low}, {high}]")
        return value

    def number(self, field: str, low: float, high: float, default: float) -> float:
        value = self.raw.get(field, default)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not low <= value <= high:
            raise BadFormat(f"{field} must be a number in [{low}, {high}]")
        return float(value)

    def hex64(self, field: str) -> str:
        value = self.raw[field]
        if not isinstance(value, str) or not _HEX64.match(value):
            raise BadFormat(f"{field} must be 64 lowercase hex digits (a SHA-256)")
        return value

    def text(self, field: str, max_len: int) -> str:
        value = self.raw[field]
        if not isinstance(value, str) or not 0 < len(value) <= max_len:
            raise BadFormat(f"{field} must be a string of 1-{max_len} characters")
        return value

    def boolean(self, field: str, default: bool) -> bool:
        value = self.raw.get(field, default)
        if not isinstance(value, bool):
            raise BadFormat(f"{field} must be true or false")
        return value

    def addresses(self, field: str, max_items: int) -> list[str]:
        """A non-empty list of ``host:port`` strings, normalized."""
        value = self.raw[field]
        if not isinstance(value, list) or not 1 <= len(value) <= max_items:
            raise BadFormat(f"{field} must be a list of 1-{max_items} 'host:port' strings")
        return [format_address(*parse_address(item, field)) for item in value]
