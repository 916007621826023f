"""A local worker: what a Globus Compute worker does with a task, for local gateways.

The client packs ``(function, args, kwargs)`` with the Globus Compute SDK's own
serializer; a worker unpacks it, runs it and packs the result: the same round trip a
real endpoint makes, so what runs here runs there. A worker is its own program
(``python -m scistream_gateway.local_worker``), started with its gateway's settings in
``SCISTREAM_GATEWAY_CONFIG``; it imports no Prefect and nothing of the caller's
``__main__``. Frames on stdin/stdout: 8-byte big-endian length, then UTF-8 text. It
writes one empty frame when ready, then one reply frame per task.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

__all__ = ["ALLOWED_SERIALIZERS", "HEADER_BYTES", "frame_length", "make_serializer",
           "read_frame", "run_packed", "strategies", "write_frame"]

# What the shipped endpoint configs allow (``allowed_serializers``), and all a local
# worker accepts: functions as source text, data as JSON. Nothing pickled is ever
# deserialized on a gateway.
ALLOWED_SERIALIZERS = (
    "globus_compute_sdk.serialize.DillCodeSource",
    "globus_compute_sdk.serialize.JSONData",
)


def strategies() -> dict:
    """The serialization every seam uses (LocalGateway, GlobusComputeGateway,
    registration), as a Globus Compute ``Client``'s keyword arguments: function
    *source* (not pickled bytecode, which ties client and endpoint to one Python
    version) and JSON data, all the shipped endpoint configs deserialize."""
    from globus_compute_sdk.serialize import DillCodeSource, JSONData

    return {"code_serialization_strategy": DillCodeSource(),
            "data_serialization_strategy": JSONData()}


def make_serializer(*, gateway_side: bool = False):
    """A serializer with :func:`strategies`; on the gateway side it deserializes only
    :data:`ALLOWED_SERIALIZERS`, as an endpoint with the shipped config does."""
    from globus_compute_sdk.serialize import ComputeSerializer

    chosen = strategies()
    return ComputeSerializer(strategy_code=chosen["code_serialization_strategy"],
                             strategy_data=chosen["data_serialization_strategy"],
                             allowed_deserializer_types=(ALLOWED_SERIALIZERS if gateway_side
                                                         else None))


def run_packed(payload: str) -> str:
    """Unpack a task, run it, pack its result."""
    serializer = make_serializer(gateway_side=True)
    try:
        function, args, kwargs = serializer.unpack_and_deserialize(payload)
    except Exception as exc:  # noqa: BLE001 - a bad task is an error reply, not a crash
        from scistream_gateway.errors import BadFormat

        return serializer.serialize(BadFormat(f"task does not deserialize: {exc}").to_wire())
    return serializer.serialize(function(*args, **kwargs))


HEADER_BYTES = 8  # a frame's length, big-endian, then that many bytes of UTF-8


def frame_length(header: bytes) -> int:
    return int.from_bytes(header, "big")


def write_frame(stream: BinaryIO, text: str) -> None:
    data = text.encode()
    stream.write(len(data).to_bytes(HEADER_BYTES, "big") + data)
    stream.flush()


def read_frame(stream: BinaryIO) -> str | None:
    """One frame, or None at end of input."""
    header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        return None
    size = frame_length(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return data.decode()


def main() -> int:
    import scistream_gateway.service  # noqa: F401 - pay for imports before "ready"

    make_serializer()
    channel_in, channel_out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a function's prints must not corrupt the frames
    write_frame(channel_out, "")
    while (payload := read_frame(channel_in)) is not None:
        write_frame(channel_out, run_packed(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
