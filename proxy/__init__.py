"""SciStream data servers (S2DS): the proxy backends a gateway starts for each stream.

The names below load ``scistream_proxy.backends`` when first used, not with the package:
a gateway's native relay imports this package and needs none of them.
"""

from __future__ import annotations

__all__ = ["BACKENDS", "ProxyBackend", "ProxyError", "ProxySpec", "get_backend"]


def __getattr__(name: str):
    if name in __all__:
        from scistream_proxy import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
