"""The shipped gateway functions (S2CS), one per call of the wire contract.

These are what gets registered with Globus Compute and serialized to an endpoint, so
each is a thin, self-contained entry point: imports inside the body, one JSON object
in, one JSON object out, safe to run twice. The logic lives in the installed package
(``scistream_gateway.service``), so a fix is a package upgrade on the gateway, not a
re-registration. Every call on a stream after ``reserve`` proves the stream's control
secret (``control``), ``hello`` excepted: it proves the hello key.
"""


def gateway_info(request: dict) -> dict:
    """Describe this gateway: name, version, backends, addresses, free ports, streams."""
    from scistream_gateway.wire import handle

    return handle("gateway_info", request)


def reserve(request: dict) -> dict:
    """Take ``num_conn`` ports and start the stream's proxy: ``uid, role, num_conn,
    key_sha256, control_sha256, owner_sha256[, rate, lease_s]`` -> ``uid, role,
    listeners, cert_fingerprint, certificate, lease_expires``."""
    from scistream_gateway.wire import handle

    return handle("reserve", request)


def hello(request: dict) -> dict:
    """An app controller proves it knows the stream's key: ``uid, key, role[,
    app_listeners]`` -> ``uid, role, listeners``."""
    from scistream_gateway.wire import handle

    return handle("hello", request)


def wait_hello(request: dict) -> dict:
    """Long-poll until the producer's hello arrived: ``uid, control[, timeout_s]`` ->
    ``uid, state, app_listeners``."""
    from scistream_gateway.wire import handle

    return handle("wait_hello", request)


def connect(request: dict) -> dict:
    """Point the proxy at its targets and pin the peer: ``uid, control, remote_listeners,
    peer_fingerprint, peer_certificate[, tls]`` -> ``uid, state, listeners, backend``."""
    from scistream_gateway.wire import handle

    return handle("connect", request)


def status(request: dict) -> dict:
    """State, proxy liveness and byte counters: ``uid, control`` -> ``uid, state, alive,
    bytes, lease_expires``."""
    from scistream_gateway.wire import handle

    return handle("status", request)


def renew(request: dict) -> dict:
    """Extend the stream's lease: ``uid, control[, lease_s]`` -> ``uid, lease_expires``."""
    from scistream_gateway.wire import handle

    return handle("renew", request)


def release(request: dict) -> dict:
    """Stop the proxy, free the ports, delete keys (idempotent): ``uid, control`` ->
    ``uid, released``."""
    from scistream_gateway.wire import handle

    return handle("release", request)


def list_streams(request: dict) -> dict:
    """The caller's active streams, newest first: ``owner`` -> ``streams`` (each ``uid,
    role, state, created, lease_expires, bytes``)."""
    from scistream_gateway.wire import handle

    return handle("list_streams", request)


from scistream_gateway.protocol import FUNCTIONS  # noqa: E402 - names the entry points above

ALL = {name: globals()[name] for name in FUNCTIONS}
"""The shipped entry point of each function of ``protocol.FUNCTIONS``, by name."""
