"""SciStream error codes and the one exception tree both sides of the wire use.

On the gateway, a function raises a :class:`SciStreamError` subclass and the wire layer
returns it as ``{"error": {"code": ..., "message": ...}}``; on the client,
:func:`error_from_wire` turns that back into the same class, so callers catch by
meaning::

    SciStreamError            any expected failure, with .code
    ├── AuthError             AUTH_ERROR      wrong hello key, control secret or peer
    ├── InvalidUid            INVALID_UID     no stream with that uid (or not in that state)
    ├── NoResource            NO_RESOURCE     ports, connections or rate capacity ran out
    ├── ConnError             CONN_ERROR      a proxy or peer could not be reached or started
    ├── BadFormat             BAD_FORMAT      malformed or conflicting request
    ├── ServerError           SERVER_ERR      a bug or broken gateway state
    ├── Timeout               TIMEOUT         waited long enough (hello, a remote call)
    ├── NotImplementedHere    NOT_IMPLEMENTED the gateway does not offer this
    └── Unavailable           UNAVAILABLE     the gateway or its backend cannot serve now

The codes are those of SciStream's draft protocol spec. Where each one comes from:

- ``AUTH_ERROR``: ``hello`` with a key whose SHA-256 is not the stream's; any other
  call on an existing stream (``wait_hello``, ``connect``, ``status``, ``renew``,
  ``release``, a repeated ``reserve``) without the stream's control secret; ``connect``
  with a ``peer_certificate`` that does not match ``peer_fingerprint``, or a repeat
  ``connect`` naming another peer than the one pinned.
- ``INVALID_UID``: a uid the gateway has no stream for (``status``, ``hello``,
  ``wait_hello``, ``connect``, ``renew``), or a stream not in a state that allows the
  call (``connect`` before the producer's hello, ``renew`` of a released stream).
  ``release`` never returns it: releasing an unknown uid succeeds.
- ``NO_RESOURCE``: the port range has fewer free ports than ``num_conn`` (the kernel
  decides what is free), ``num_conn`` above the gateway's ``max_num_conn``, the rate
  capacity would be exceeded, or a gateway with a capacity is asked for no rate. The
  message says which.
- ``CONN_ERROR``: a proxy could not be started (including no systemd scope where one
  is required), refused ``connect``, or had died before ``connect``. ``status`` of a
  ``FAILED`` stream carries it as ``error_code``, with ``last_error`` saying why; so
  does that of a live stream whose relayed connections failed (a peer unreachable or
  refusing: ``connections.failed`` counts them).
- ``BAD_FORMAT``: any malformed request (not an object, unknown or missing fields,
  uids, roles, addresses, numbers, lists), a repeated ``reserve`` with other
  parameters, or a uid used again after its stream ended.
- ``SERVER_ERR``: the gateway's own settings are missing or broken, its state
  directory belongs to another user, or a bug (logged with a reference in the state
  directory's ``gateway.log``).
- ``TIMEOUT``: raised by the client, never returned by a gateway: every wait on the
  gateway is bounded and reports where it got to (``wait_hello`` returns the stream's
  state after ``timeout_s``), and the client raises ``TIMEOUT`` when its own deadline
  for a call or for a loop of ``wait_hello`` passes.
- ``NOT_IMPLEMENTED``: a function name the gateway does not have (``wire.handle``), a
  feature the configured proxy backend does not offer, or plain TCP between gateways
  (``connect`` with ``tls: false``) on a gateway whose settings do not allow it.
- ``UNAVAILABLE``: the configured backend cannot run on this node (or what it needs,
  such as its container engine, cannot be used right now), the gateway's own address
  does not resolve, its state database stayed locked by other workers for longer than
  60 s, or a reserve/connect of this uid is in progress (``release`` waits up to 30 s
  for it first): the request was fine, try again later or elsewhere. A client whose
  call's worker died (``LocalGateway``) gets it too.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BadFormat",
    "ConnError",
    "ERROR_CODES",
    "InvalidUid",
    "NoResource",
    "NotImplementedHere",
    "SciStreamError",
    "ServerError",
    "Timeout",
    "Unavailable",
    "error_from_wire",
]


class SciStreamError(Exception):
    """An expected failure with a SciStream error code."""

    code = "SERVER_ERR"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class AuthError(SciStreamError):
    code = "AUTH_ERROR"


class InvalidUid(SciStreamError):
    code = "INVALID_UID"


class NoResource(SciStreamError):
    code = "NO_RESOURCE"


class ConnError(SciStreamError):
    code = "CONN_ERROR"


class BadFormat(SciStreamError):
    code = "BAD_FORMAT"


class ServerError(SciStreamError):
    code = "SERVER_ERR"


class Timeout(SciStreamError):
    code = "TIMEOUT"


class NotImplementedHere(SciStreamError):
    code = "NOT_IMPLEMENTED"


class Unavailable(SciStreamError):
    code = "UNAVAILABLE"


ERROR_CODES: dict[str, type[SciStreamError]] = {
    cls.code: cls
    for cls in (AuthError, InvalidUid, NoResource, ConnError, BadFormat, ServerError,
                Timeout, NotImplementedHere, Unavailable)
}


def error_from_wire(reply: object) -> SciStreamError | None:
    """The exception a gateway reply stands for, or None if it is not an error reply."""
    if not isinstance(reply, dict) or "error" not in reply:
        return None
    error = reply["error"]
    if not isinstance(error, dict):
        return ServerError(f"malformed error reply: {error!r}")
    cls = ERROR_CODES.get(error.get("code"), ServerError)
    return cls(str(error.get("message", "")))
