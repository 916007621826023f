"""SciStream's user client (S2UC) as Prefect tasks and flows.

Open a stream between two gateways, give the consumer app its listeners, release it::

    from scistream_prefect import LocalGateway, open_stream, release_stream

Two local gateways on one machine, released and closed together: ``LocalPair``.

Errors are one tree, caught by meaning (``except NoResource``); see
``scistream_gateway.errors``.
"""

from scistream_gateway.errors import (
    AuthError,
    BadFormat,
    ConnError,
    InvalidUid,
    NoResource,
    NotImplementedHere,
    SciStreamError,
    ServerError,
    Timeout,
    Unavailable,
)
from scistream_prefect.flows import (
    StreamHandle,
    open_stream,
    release_stream,
    setup_stream,
    teardown_stream,
)
from scistream_prefect.auth import GlobusCredentials
from scistream_prefect.compute import GlobusComputeGateway
from scistream_prefect.gateways import Gateway, LocalGateway
from scistream_prefect.local_pair import LocalPair
from scistream_prefect.session import release_session_streams, stream_session
from scistream_prefect.tasks import (
    connect_gateway_proxy,
    get_gateway_info,
    get_stream_status,
    release_gateway_stream,
    renew_stream_lease,
    reserve_gateway_ports,
    send_app_hello,
    wait_for_app_hello,
)

__all__ = [
    "AuthError",
    "BadFormat",
    "ConnError",
    "Gateway",
    "GlobusComputeGateway",
    "GlobusCredentials",
    "InvalidUid",
    "LocalGateway",
    "LocalPair",
    "NoResource",
    "NotImplementedHere",
    "SciStreamError",
    "ServerError",
    "StreamHandle",
    "Timeout",
    "Unavailable",
    "connect_gateway_proxy",
    "get_gateway_info",
    "get_stream_status",
    "open_stream",
    "release_gateway_stream",
    "release_stream",
    "renew_stream_lease",
    "release_session_streams",
    "reserve_gateway_ports",
    "send_app_hello",
    "stream_session",
    "setup_stream",
    "teardown_stream",
    "wait_for_app_hello",
]
