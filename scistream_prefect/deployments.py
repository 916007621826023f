"""Deployments of the stream flows, for starting them from the Prefect UI or its API.

``scistream serve`` serves ``open-stream/scistream`` and ``release-stream/scistream``
from this process (no work pool needed); ``prefect.yaml`` at the repository root
declares the same two for ``prefect deploy`` onto a process work pool. Both name the
flows by module path (``scistream_prefect.flows.streams.open_stream``), so whatever runs
them imports the installed package, whatever its working directory.
"""

from __future__ import annotations

__all__ = ["DEPLOYMENT_NAME", "deployments", "serve"]

DEPLOYMENT_NAME = "scistream"


def deployments() -> list:
    """The two deployments, with their parameters described from the flows' signatures."""
    from prefect.types.entrypoint import EntrypointType

    from scistream_prefect.flows.streams import open_stream, release_stream

    return [
        open_stream.to_deployment(
            name=DEPLOYMENT_NAME, tags=["scistream"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            description="Open a SciStream stream between two gateway blocks; the run shows "
            "its listeners table and summary. Release it with release-stream/scistream.",
        ),
        release_stream.to_deployment(
            name=DEPLOYMENT_NAME, tags=["scistream"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            description="Release both ends of a SciStream stream by uid (idempotent).",
        ),
    ]


def serve(limit: int | None = None) -> None:
    """Serve both deployments until interrupted (runs each flow run in a subprocess)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(), limit=limit, print_starting_message=True)
