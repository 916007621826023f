"""SciStream's user client (S2UC) as Prefect tasks and flows.

Open a stream between two gateways, give the consumer app its listeners, release it::

    from scistream_prefect import LocalGateway, open_stream, release_stream  # noqa: F401

Two local gateways on one machine, released and closed together: ``LocalPair``.

Errors are one tree, caught by meaning (``except NoResource``); see
``scistream_gateway.errors``.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ imports
    from scistream_gateway.errors import (  # noqa: F401
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
    from scistream_prefect.auth import GlobusCredentials  # noqa: F401
    from scistream_prefect.compute import GlobusComputeGateway  # noqa: F401
    from scistream_prefect.flows import (  # noqa: F401
        open_stream,
        release_stream,
        setup_stream,
        teardown_stream,
    )
    from scistream_prefect.gateways import Gateway, LocalGateway  # noqa: F401
    from scistream_prefect.local_pair import LocalPair  # noqa: F401
    from scistream_prefect.session import release_session_streams, stream_session  # noqa: F401
    from scistream_prefect.streams_core import StreamHandle  # noqa: F401
    from scistream_prefect.tasks import (  # noqa: F401
        connect_gateway_proxy,
        get_gateway_info,
        get_stream_status,
        release_gateway_stream,
        renew_stream_lease,
        reserve_gateway_ports,
        send_app_hello,
        wait_for_app_hello,
    )

# Public name -> the module that defines it. Imported on first use (module __getattr__),
# so `import scistream_prefect` and `scistream --help` do not import Prefect.
_HOMES = {
    "AuthError": "scistream_gateway.errors",
    "BadFormat": "scistream_gateway.errors",
    "ConnError": "scistream_gateway.errors",
    "InvalidUid": "scistream_gateway.errors",
    "NoResource": "scistream_gateway.errors",
    "NotImplementedHere": "scistream_gateway.errors",
    "SciStreamError": "scistream_gateway.errors",
    "ServerError": "scistream_gateway.errors",
    "Timeout": "scistream_gateway.errors",
    "Unavailable": "scistream_gateway.errors",
    "open_stream": "scistream_prefect.flows",
    "release_stream": "scistream_prefect.flows",
    "setup_stream": "scistream_prefect.flows",
    "teardown_stream": "scistream_prefect.flows",
    "StreamHandle": "scistream_prefect.streams_core",
    "GlobusCredentials": "scistream_prefect.auth",
    "GlobusComputeGateway": "scistream_prefect.compute",
    "Gateway": "scistream_prefect.gateways",
    "LocalGateway": "scistream_prefect.gateways",
    "LocalPair": "scistream_prefect.local_pair",
    "release_session_streams": "scistream_prefect.session",
    "stream_session": "scistream_prefect.session",
    "connect_gateway_proxy": "scistream_prefect.tasks",
    "get_gateway_info": "scistream_prefect.tasks",
    "get_stream_status": "scistream_prefect.tasks",
    "release_gateway_stream": "scistream_prefect.tasks",
    "renew_stream_lease": "scistream_prefect.tasks",
    "reserve_gateway_ports": "scistream_prefect.tasks",
    "send_app_hello": "scistream_prefect.tasks",
    "wait_for_app_hello": "scistream_prefect.tasks",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'scistream_prefect' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))

