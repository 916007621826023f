"""Run the shipped gateway functions as a Globus Compute endpoint does, on this host.

:class:`EndpointEngine` starts globus-compute-endpoint's own ``ProcessPoolEngine`` (the
engine the shipped endpoint configs use), packs every call the way the SDK and the web
service do (the function as registered, then the arguments, each with the SDK's
serializer, inside a messagepack ``Task``), submits it through the engine's own
``submit`` (which runs ``execute_task`` in a worker process: the endpoint's
deserializer allow-list, its working directory, its result packing) and unpacks the
``Result``. Only the Globus cloud in between is missing. ``scistream-gateway info``
uses it so an operator sees what an endpoint worker would see; the tests use it to run
every gateway function as an endpoint would.

Needs the ``gateway`` extra (globus-compute-endpoint).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from scistream_gateway.local_worker import ALLOWED_SERIALIZERS, make_serializer
from scistream_gateway.settings import CONFIG_ENV

__all__ = ["ALLOWED_SERIALIZERS", "EndpointEngine", "make_serializer"]


def _set_environment(environ: dict) -> None:
    os.environ.update(environ)


class EndpointEngine:
    """A started ``ProcessPoolEngine`` whose workers see ``environ`` (for example
    ``SCISTREAM_GATEWAY_CONFIG``), used as a context manager::

        with EndpointEngine({"SCISTREAM_GATEWAY_CONFIG": "/etc/scistream/gateway.toml"}) as e:
            print(e.call("gateway_info", {}))
    """

    def __init__(self, environ: dict | None = None, *, max_workers: int = 2,
                 run_dir: Path | None = None,
                 allowed_serializers: tuple[str, ...] | None = ALLOWED_SERIALIZERS):
        from globus_compute_endpoint.engines import ProcessPoolEngine

        self._tmp = None
        if run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="scistream-engine-")
            run_dir = Path(self._tmp.name)
        self.run_dir = run_dir
        self.environ = {k: str(v) for k, v in (environ or {}).items()}
        self.engine = ProcessPoolEngine(
            max_workers=max_workers,
            initializer=_set_environment,
            initargs=(self.environ,),
            allowed_serializers=list(allowed_serializers) if allowed_serializers else None,
        )
        self.endpoint_id = uuid.uuid4()
        self.serializer = make_serializer()
        self._registered: dict[str, str] = {}

    def __enter__(self) -> EndpointEngine:
        self.engine.start(endpoint_id=self.endpoint_id, run_dir=str(self.run_dir))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.shutdown(block=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def worker_pids(self) -> list[int]:
        """Pids of the engine's worker processes (for tests that kill them)."""
        executor = self.engine.executor
        return [] if executor is None else list(executor._processes)

    def function_code(self, name: str) -> str:
        """The function's code as registration uploads it (and the service keeps)."""
        if name not in self._registered:
            from globus_compute_sdk.sdk.client import FunctionRegistrationData

            from scistream_gateway.functions import ALL

            data = FunctionRegistrationData(function=ALL[name], serializer=self.serializer)
            self._registered[name] = data.function_code
        return self._registered[name]

    def pack(self, name: str, request: object) -> bytes:
        """One task as an endpoint receives it: registered code + serialized arguments."""
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task

        s = self.serializer
        arguments = s.pack_buffers([s.serialize((request,)), s.serialize({})])
        return messagepack.pack(Task(task_id=uuid.uuid4(),
                                     task_buffer=self.function_code(name) + arguments))

    def submit(self, name: str, request: object):
        """Submit one call; returns the engine's future (its result: a packed Result)."""
        from globus_compute_endpoint.engines.base import GCFuture

        packed = self.pack(name, request)
        future = GCFuture(gc_task_id=uuid.uuid4())
        self.engine.submit(future, packed, resource_specification={})
        return future

    def result(self, future, timeout_s: float | None = 120) -> object:
        """The function's return value, or RuntimeError with the endpoint's traceback."""
        from globus_compute_common import messagepack

        result = messagepack.unpack(future.result(timeout=timeout_s))
        if result.is_error:
            raise RuntimeError(f"task failed on the endpoint engine:\n{result.data}")
        return self.serializer.deserialize(result.data)

    def call(self, name: str, request: object, timeout_s: float | None = 120) -> object:
        """Run gateway function ``name`` on ``request`` in an engine worker."""
        return self.result(self.submit(name, request), timeout_s)


def engine_for(settings_path: Path, **kwargs) -> EndpointEngine:
    """An engine whose workers read the gateway settings at ``settings_path``."""
    return EndpointEngine({CONFIG_ENV: str(Path(settings_path).resolve())}, **kwargs)
