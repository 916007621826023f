"""Prefect flows: open and release streams, and the demo."""

from scistream_prefect.flows.streams import (
    StreamHandle,
    open_stream,
    release_stream,
    setup_stream,
    teardown_stream,
)

__all__ = ["StreamHandle", "open_stream", "release_stream", "setup_stream", "teardown_stream"]
