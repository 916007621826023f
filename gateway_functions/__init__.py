"""SciStream control server (S2CS) as Globus Compute functions.

``scistream_gateway.functions`` holds the shipped entry points, ``service`` their
logic, ``errors`` the SciStream error codes shared with the client.
"""


def __getattr__(name: str) -> str:
    # ``__version__`` on first use: importlib.metadata takes 40 ms to import, a tenth of
    # a one-shot ``scistream status`` (bench/cli.py), which never asks for it.
    if name != "__version__":
        raise AttributeError(f"module 'scistream_gateway' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("scistream-prefect")
    except PackageNotFoundError:  # running from a source tree
        found = "0.0.0+source"
    globals()["__version__"] = found  # later lookups skip this function
    return found
