"""SciStream data servers (S2DS): the proxy backends a gateway starts for each stream.

A gateway's native relay is started with ``SCISTREAM_PROXY_RELAY=1`` in its
environment: it imports only ``scistream_proxy.native`` and what that needs, not every
backend (about 100 ms less to start it). Everywhere else the backends load with the
package, as ``scistream_proxy.docker_backends`` requires (it and ``backends`` import
each other; ``backends`` must come first).
"""

from __future__ import annotations

import os

if os.environ.get("SCISTREAM_PROXY_RELAY") != "1":
    from scistream_proxy.backends import (
        BACKENDS,
        ProxyBackend,
        ProxyError,
        ProxySpec,
        get_backend,
    )

__all__ = ["BACKENDS", "ProxyBackend", "ProxyError", "ProxySpec", "get_backend"]
