"""Tasks on one end of a stream, one remote gateway call each.

Calls with side effects (reserve, connect, release) are never cached and never
retried blindly; the gateway functions are idempotent per ``uid``, so a caller that
lost a reply may call again with the same arguments.
"""

from __future__ import annotations

import hashlib
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from scistream_gateway.errors import Timeout
from scistream_prefect.gateways import Gateway

__all__ = [
    "connect_gateway_proxy",
    "get_stream_status",
    "release_gateway_stream",
    "renew_stream_lease",
    "reserve_gateway_ports",
    "send_app_hello",
    "wait_for_app_hello",
]


def _reveal(key: SecretStr | str) -> str:
    # Keys travel between tasks as SecretStr, so no record of a task run can show them.
    return key.get_secret_value() if isinstance(key, SecretStr) else key


@task(name="reserve-gateway-ports", cache_policy=NO_CACHE)
def reserve_gateway_ports(
    gateway: Gateway, uid: str, role: str, num_conn: int, hello_key: SecretStr | str,
    rate: int = 0, lease_s: int | None = None,
) -> dict:
    """Reserve ``num_conn`` ports on one gateway and start its proxy for stream ``uid``.

    Only the SHA-256 of ``hello_key`` leaves this task. Returns the gateway's
    ``listeners``, ``cert_fingerprint``, ``certificate`` and ``lease_expires``.

    Example:
        ```python
        import secrets, uuid
        from prefect import flow
        from scistream_prefect import LocalGateway, reserve_gateway_ports, release_gateway_stream

        @flow
        def reserve_and_release():
            gw = LocalGateway.create("facility-c", "/tmp/facility-c", port_range=(51100, 51199))
            uid = str(uuid.uuid4())
            reply = reserve_gateway_ports(gw, uid, "CONS", 2, secrets.token_urlsafe(32))
            release_gateway_stream(gw, uid)
            return reply["listeners"]
        ```
    """
    request = {"uid": uid, "role": role, "num_conn": num_conn, "rate": rate,
               "key_sha256": hashlib.sha256(_reveal(hello_key).encode()).hexdigest()}
    if lease_s is not None:
        request["lease_s"] = lease_s
    return gateway.call("reserve", request)


@task(name="send-app-hello", cache_policy=NO_CACHE)
def send_app_hello(
    gateway: Gateway, uid: str, hello_key: SecretStr | str, role: str,
    app_listeners: list[str] | None = None,
) -> dict:
    """Send an app controller's hello: the producer gives where its app listens.

    Returns the gateway's ``listeners`` (for a consumer: where its app connects).
    """
    request = {"uid": uid, "key": _reveal(hello_key), "role": role}
    if app_listeners is not None:
        request["app_listeners"] = list(app_listeners)
    return gateway.call("hello", request)


@task(name="wait-for-app-hello", cache_policy=NO_CACHE)
def wait_for_app_hello(
    gateway: Gateway, uid: str, max_wait_seconds: float = 300.0,
    poll_frequency_seconds: float = 10.0,
) -> list[str]:
    """Wait until the producer's controller said hello; return its ``app_listeners``.

    Each gateway call is a long-poll of up to ``poll_frequency_seconds``.

    Raises:
        Timeout: no hello within ``max_wait_seconds``.
    """
    deadline = time.monotonic() + max_wait_seconds
    while True:
        remaining = deadline - time.monotonic()
        reply = gateway.call("wait_hello", {
            "uid": uid, "timeout_s": max(0.0, min(poll_frequency_seconds, remaining, 20.0)),
        })
        if reply["state"] != "RESERVED":
            return reply["app_listeners"]
        if time.monotonic() >= deadline:
            raise Timeout(f"no hello for stream {uid} within {max_wait_seconds} s")


@task(name="connect-gateway-proxy", cache_policy=NO_CACHE)
def connect_gateway_proxy(
    gateway: Gateway, uid: str, remote_listeners: list[str],
    peer_fingerprint: str | None, peer_certificate: str | None, tls: bool = True,
) -> dict:
    """Point one gateway's proxy at its targets and pin the peer gateway's certificate.

    Returns once the proxy accepts connections. ``tls=False`` turns encryption off on
    the gateway-to-gateway hop and must be asked for by name.
    """
    request: dict = {"uid": uid, "remote_listeners": list(remote_listeners), "tls": tls}
    if tls:
        request.update(peer_fingerprint=peer_fingerprint, peer_certificate=peer_certificate)
    return gateway.call("connect", request)


@task(name="get-stream-status", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def get_stream_status(gateway: Gateway, uid: str) -> dict:
    """State, proxy liveness and byte counters of one stream end (read-only, retried)."""
    return gateway.call("status", {"uid": uid})


@task(name="renew-stream-lease", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def renew_stream_lease(gateway: Gateway, uid: str, lease_s: int | None = None) -> float:
    """Extend the lease of one stream end; returns the new expiry (Unix time)."""
    request: dict = {"uid": uid}
    if lease_s is not None:
        request["lease_s"] = lease_s
    return gateway.call("renew", request)["lease_expires"]


@task(name="release-gateway-stream", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def release_gateway_stream(gateway: Gateway, uid: str) -> bool:
    """Stop one end's proxy, free its ports, delete its keys (idempotent, so retried)."""
    return gateway.call("release", {"uid": uid})["released"]
