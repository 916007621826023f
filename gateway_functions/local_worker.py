"""What a Globus Compute worker does with a task, for gateways run locally.

The client packs ``(function, args, kwargs)`` with the Globus Compute SDK's own
serializer; a worker process unpacks it, runs it, and packs the result: the same
round trip a real endpoint makes, so what runs here runs there. Workers are plain
processes named by their gateway's settings file; they import no Prefect.
"""

from __future__ import annotations

import os

__all__ = ["init_worker", "make_serializer", "run_packed"]


def make_serializer():
    """The serializer both seams use: function *source* (not pickled bytecode, which
    ties client and endpoint to one Python version) and JSON-safe data."""
    from globus_compute_sdk.serialize import ComputeSerializer, DillCodeSource

    return ComputeSerializer(strategy_code=DillCodeSource())


def init_worker(settings_path: str) -> None:
    """Process-pool initializer: this worker serves the gateway of ``settings_path``."""
    from scistream_gateway.settings import CONFIG_ENV

    os.environ[CONFIG_ENV] = settings_path


def run_packed(payload: str) -> str:
    """Unpack a task, run it, pack its result (an exception travels back packed too)."""
    serializer = make_serializer()
    function, args, kwargs = serializer.unpack_and_deserialize(payload)
    return serializer.serialize(function(*args, **kwargs))
