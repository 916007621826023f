"""Where gateway functions run: the one seam between the client (S2UC) and S2CS.

Every gateway block has ``call(function, request) -> reply``; a reply carrying an
error becomes the matching :class:`~scistream_gateway.errors.SciStreamError`.
:class:`LocalGateway` runs the shipped functions in local worker processes after the
Globus Compute serialization round trip: two of them on loopback make a whole stream
on one machine. A gateway behind a real Globus Compute endpoint plugs in at the same
seam.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Protocol, runtime_checkable

from prefect.blocks.core import Block
from pydantic import Field

from scistream_gateway.errors import Timeout, Unavailable, error_from_wire
from scistream_gateway.settings import GatewaySettings

__all__ = ["Gateway", "LocalGateway"]


@runtime_checkable
class Gateway(Protocol):
    """What the tasks need of a gateway, wherever its functions run."""

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict: ...

    @property
    def label(self) -> str: ...


# Worker pools are per process and per gateway; they are created in the process that
# uses them (never pickled into a task parameter) and shut down at exit.
_POOLS: dict[tuple[int, str], ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _shutdown_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.shutdown(wait=True, cancel_futures=True)
        _POOLS.clear()


atexit.register(_shutdown_pools)


class LocalGateway(Block):
    """A gateway whose functions run in local worker processes (the embedded default).

    Its settings are a gateway TOML file, the same format a real gateway node uses
    (see ``scistream_gateway.settings``). ``LocalGateway.create(...)`` writes one.

    Example:
        ```python
        from prefect import flow
        from scistream_prefect import LocalGateway, get_gateway_info

        @flow
        def check():
            gw = LocalGateway.create("facility-p", "/tmp/facility-p", port_range=(51000, 51099))
            return get_gateway_info(gw)
        ```
        A saved block loads with ``LocalGateway.load("facility-p")``.
    """

    _block_type_name = "SciStream Local Gateway"
    _description = "A SciStream gateway whose functions run in local worker processes."

    settings_path: Path = Field(
        description="Path of the gateway's TOML settings file ([gateway] table: name, "
        "state_dir, addresses, port range, backend)."
    )
    workers: int = Field(
        default=2, ge=1, le=64,
        description="Worker processes running gateway functions concurrently.",
    )
    call_timeout_s: float = Field(
        default=120.0, gt=0,
        description="Seconds to wait for one function call before it is a TIMEOUT.",
    )

    @classmethod
    def create(
        cls,
        name: str,
        state_dir: str | Path,
        *,
        lan_address: str = "127.0.0.1",
        wan_address: str = "127.0.0.1",
        port_range: tuple[int, int] = (50000, 50999),
        **settings: object,
    ) -> LocalGateway:
        """Write ``<state_dir>/gateway.toml`` for a new local gateway and return its block."""
        state_dir = Path(state_dir).expanduser().resolve()
        gateway = GatewaySettings(
            name=name, state_dir=state_dir, lan_address=lan_address, wan_address=wan_address,
            port_min=port_range[0], port_max=port_range[1], **settings,  # type: ignore[arg-type]
        )
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / "gateway.toml"
        path.write_text(gateway.to_toml())
        return cls(settings_path=path)

    @property
    def settings(self) -> GatewaySettings:
        return GatewaySettings.from_toml(self.settings_path)

    @property
    def label(self) -> str:
        return f"local:{self.settings.name}"

    def _pool(self) -> ProcessPoolExecutor:
        from scistream_gateway.local_worker import init_worker

        key = (os.getpid(), str(self.settings_path))
        with _POOLS_LOCK:
            pool = _POOLS.get(key)
            if pool is None:
                pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    # spawn, not fork: the client process runs threads (Prefect's).
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=init_worker,
                    initargs=(str(self.settings_path),),
                )
                _POOLS[key] = pool
            return pool

    def _drop_pool(self) -> None:
        with _POOLS_LOCK:
            pool = _POOLS.pop((os.getpid(), str(self.settings_path)), None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict:
        """Run gateway function ``function`` on ``request``; raise its error, if any."""
        from scistream_gateway.functions import ALL
        from scistream_gateway.local_worker import make_serializer, run_packed

        serializer = make_serializer()
        payload = serializer.pack_buffers([
            serializer.serialize(ALL[function]),
            serializer.serialize((request,)),
            serializer.serialize({}),
        ])
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            packed = self._pool().submit(run_packed, payload).result(timeout=timeout)
        except FutureTimeout:
            raise Timeout(f"{function} on {self.label} did not finish in {timeout} s") from None
        except BrokenProcessPool:
            self._drop_pool()
            raise Unavailable(f"a worker of {self.label} died during {function}") from None
        reply = serializer.deserialize(packed)
        error = error_from_wire(reply)
        if error is not None:
            raise error
        return reply

    def warm_up(self) -> None:
        """Start the worker processes now (their first call otherwise pays for it)."""
        pool = self._pool()
        for future in [pool.submit(os.getpid) for _ in range(self.workers)]:
            future.result()
