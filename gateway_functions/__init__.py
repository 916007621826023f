"""SciStream control server (S2CS) as Globus Compute functions.

``scistream_gateway.functions`` holds the shipped entry points, ``service`` their
logic, ``errors`` the SciStream error codes shared with the client.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scistream-prefect")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
