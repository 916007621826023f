"""SciStream data servers (S2DS): the proxy backends a gateway starts for each stream."""

from scistream_proxy.backends import BACKENDS, ProxyBackend, ProxyError, ProxySpec, get_backend

__all__ = ["BACKENDS", "ProxyBackend", "ProxyError", "ProxySpec", "get_backend"]
