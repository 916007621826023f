"""Where gateway functions run: the one seam between the client (S2UC) and S2CS.

Every gateway block has ``call(function, request) -> reply``; a reply carrying an
error becomes the matching :class:`~scistream_gateway.errors.SciStreamError`. ``call``
is where the proofs of ownership join a request (:func:`~scistream_prefect.ownership.
with_proofs`), so no task parameter, result or log line carries a secret.
:class:`LocalGateway` runs the shipped functions in local worker processes after the
Globus Compute serialization round trip: two of them on loopback make a whole stream
on one machine. A gateway behind a real Globus Compute endpoint plugs in at the same
seam.
"""

from __future__ import annotations

import atexit
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Protocol, runtime_checkable

from prefect.blocks.core import Block
from pydantic import Field

from globus_compute_sdk.errors import SerializationError

from scistream_gateway.errors import BadFormat, Timeout, Unavailable, error_from_wire
from scistream_gateway.local_worker import (
    HEADER_BYTES,
    frame_length,
    make_serializer,
    write_frame,
)
from scistream_gateway.settings import CONFIG_ENV, GatewaySettings
from scistream_prefect.ownership import with_proofs

__all__ = ["Gateway", "LocalGateway", "close_local_gateways"]


def _readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout_s`` (``poll``: a client with
    hundreds of streams has descriptors above ``select``'s limit of 1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


@runtime_checkable
class Gateway(Protocol):
    """What the tasks need of a gateway, wherever its functions run."""

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict:
        """Run ``function`` on ``request`` with this client's proofs of ownership added."""
        ...

    @property
    def label(self) -> str: ...


class _Worker:
    """One local worker process (``python -m scistream_gateway.local_worker``)."""

    def __init__(self, settings: GatewaySettings, settings_path: Path):
        log_fd = os.open(settings.make_state_dir() / "workers.log",
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                # -P: never import from the working directory.
                [sys.executable, "-P", "-m", "scistream_gateway.local_worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_fd,
                env={**os.environ, CONFIG_ENV: str(settings_path)},
                start_new_session=True,  # a Ctrl-C in a notebook must not kill a call halfway
            )
        finally:
            os.close(log_fd)
        # Readable once the process has exited as a whole, whoever reaps it: how the pool
        # tells a dead idle worker apart without reaping it.
        self.pidfd = os.pidfd_open(self.proc.pid)

    def exited(self) -> bool:
        return _readable(self.pidfd, 0)

    def call(self, payload: str | None, deadline: float) -> str:
        """Send one frame (None: only wait for the ready frame) and read the reply."""
        if payload is not None:
            write_frame(self.proc.stdin, payload)
        size = frame_length(self._read(HEADER_BYTES, deadline))
        return self._read(size, deadline).decode()

    def _read(self, size: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        chunks, left = [], size
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _readable(fd, remaining):
                raise FutureTimeout()
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise BrokenPipeError(f"local worker {self.proc.pid} {self._exit()}")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _exit(self) -> str:
        """How the worker ended, as far as is known a moment after its pipe closed."""
        try:
            code = self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "closed its output"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.pidfd)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # unflushed bytes to a dead worker
                pass


class _WorkerPool:
    """Up to ``size`` workers for one gateway, each running one call at a time."""

    def __init__(self, settings_path: Path, size: int):
        self.settings_path = settings_path
        self.settings = GatewaySettings.from_toml(settings_path)
        self.size = size
        self.idle: list[_Worker] = []
        self.busy: set[_Worker] = set()
        self.count = 0  # idle + busy + starting
        self.closed = False  # workers handed back after close() are stopped
        self.cond = threading.Condition()

    def acquire(self, deadline: float) -> _Worker:
        dead: list[_Worker] = []
        with self.cond:
            while True:
                # A worker that died while idle (OOM killer, an operator) is replaced,
                # not handed out to fail the next call.
                while self.idle and self.idle[-1].exited():
                    dead.append(self.idle.pop())
                    self.count -= 1
                if self.idle:
                    worker = self.idle.pop()
                    self.busy.add(worker)
                    break
                if self.count < self.size:
                    self.count += 1
                    worker = None
                    break
                if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                    raise FutureTimeout()
        for corpse in dead:
            corpse.close()
        if worker is not None:
            return worker
        try:
            worker = _Worker(self.settings, self.settings_path)
            worker.call(None, deadline)  # the ready frame: imports are done
        except BaseException:
            with self.cond:
                self.count -= 1
                self.cond.notify()
            raise
        with self.cond:
            self.busy.add(worker)
        return worker

    def release(self, worker: _Worker, healthy: bool) -> None:
        healthy = healthy and not self.closed
        if not healthy:
            worker.close()
        with self.cond:
            self.busy.discard(worker)
            if healthy:
                self.idle.append(worker)
            else:
                self.count -= 1
            self.cond.notify()

    def pids(self) -> list[int]:
        with self.cond:
            return sorted(w.proc.pid for w in (*self.idle, *self.busy))

    def close(self) -> None:
        """Stop the idle workers now and the busy ones when their call returns."""
        with self.cond:
            idle, self.idle = self.idle, []
            self.count -= len(idle)
            self.closed = True
        for worker in idle:
            worker.close()


# Pools are per client process and per gateway, created where they are used (never
# pickled into a task parameter) and closed by LocalGateway.close, close_local_gateways
# or at exit.
_POOLS: dict[tuple[int, str, int], _WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def _take_pools(settings_path: str | None = None) -> list[_WorkerPool]:
    with _POOLS_LOCK:
        # A forked child's copies of its parent's pools are not its own to stop.
        keys = [k for k in _POOLS if k[0] == os.getpid()
                and (settings_path is None or k[1] == settings_path)]
        return [_POOLS.pop(k) for k in keys]


@atexit.register
def close_local_gateways() -> None:
    """Stop the worker processes of every :class:`LocalGateway` this process called."""
    for pool in _take_pools():
        pool.close()


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
    _logo_url = "https://github.com/scistream.png"  # the SciStream organisation's avatar
    _documentation_url = "https://scistream.readthedocs.io/en/latest/"

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

    def _pool(self) -> _WorkerPool:
        key = (os.getpid(), str(self.settings_path), self.workers)
        with _POOLS_LOCK:
            pool = _POOLS.get(key)
            if pool is None:
                pool = _POOLS[key] = _WorkerPool(self.settings_path, self.workers)
            return pool

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict:
        """Run gateway function ``function`` on ``request`` with this client's proofs of
        ownership added (fields it already has are kept); raise its error, if any."""
        from scistream_gateway.functions import ALL
        from scistream_gateway.protocol import FUNCTIONS

        if function not in FUNCTIONS:  # as GlobusComputeGateway.submit says it
            raise BadFormat(f"no gateway function {function!r:.80}; known: {sorted(FUNCTIONS)}")
        request = with_proofs(function, request)
        serializer = make_serializer()
        try:
            payload = serializer.pack_buffers([
                serializer.serialize(ALL[function]),
                serializer.serialize((request,)),
                serializer.serialize({}),
            ])
        except (SerializationError, TypeError, ValueError, RecursionError) as exc:
            raise BadFormat(f"{function} request does not serialize: {exc}") from None
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        pool = self._pool()
        worker, healthy = None, False
        try:
            worker = pool.acquire(deadline)
            packed = worker.call(payload, deadline)
            healthy = True
        except FutureTimeout:
            raise Timeout(f"{function} on {self.label} did not finish in {timeout} s") from None
        except OSError as exc:
            log = pool.settings.state_dir / "workers.log"
            raise Unavailable(f"a worker of {self.label} died during {function}: {exc}"
                              f" (see {log})") from None
        finally:
            # A worker that timed out is killed: its call is abandoned, not left running.
            if worker is not None:
                pool.release(worker, healthy)
        reply = serializer.deserialize(packed)
        error = error_from_wire(reply)
        if error is not None:
            raise error
        return reply

    def worker_pids(self) -> list[int]:
        """Process ids of this process's live workers for this gateway (none before a call)."""
        mine = (os.getpid(), str(self.settings_path))
        with _POOLS_LOCK:
            pools = [pool for key, pool in _POOLS.items() if key[:2] == mine]
        return sorted(pid for pool in pools for pid in pool.pids())

    def close(self) -> None:
        """Stop this process's workers for this gateway; the next call starts new ones.

        Streams are not touched: they live on the gateway (release them first)."""
        for pool in _take_pools(str(self.settings_path)):
            pool.close()

    def warm_up(self, timeout_s: float = 60.0) -> None:
        """Start all worker processes now (a first call otherwise pays for its worker)."""
        pool = self._pool()
        deadline = time.monotonic() + timeout_s
        workers = [pool.acquire(deadline) for _ in range(self.workers)]
        for worker in workers:
            pool.release(worker, healthy=True)
