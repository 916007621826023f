"""What gateway tests share: a reservation in one call, a planted fault, and every worker
of a LocalGateway killed as an endpoint restart kills them."""

from __future__ import annotations

import hashlib
import math
import os
import select
import signal
import time
import uuid
from pathlib import Path

from scistream_gateway.engine import EndpointEngine
from scistream_gateway.settings import CONFIG_ENV
from scistream_prefect.ownership import with_proofs


class ProvenEngine(EndpointEngine):
    """An endpoint engine whose calls carry this client's proofs of ownership, as
    ``Gateway.call`` adds them (fields a request has are kept)."""

    def submit(self, name: str, request: object):
        return super().submit(name, with_proofs(name, request))


def engine_for(settings_path: Path, **kwargs) -> ProvenEngine:
    """A :class:`ProvenEngine` whose workers read the gateway settings at ``settings_path``."""
    return ProvenEngine({CONFIG_ENV: str(Path(settings_path).resolve())}, **kwargs)


def reserve(gw, role="PROD", num_conn=2, key="k" * 43, uid=None, **extra):
    uid = uid or str(uuid.uuid4())
    request = {"uid": uid, "role": role, "num_conn": num_conn,
               "key_sha256": hashlib.sha256(key.encode()).hexdigest(), **extra}
    return uid, key, gw.call("reserve", request)


def plant(gw, step: str) -> Path:
    """The next worker that reaches fault point ``step`` dies there (SCISTREAM_TEST_FAULTS)."""
    directory = gw.settings.state_dir / "test-faults"
    directory.mkdir(exist_ok=True)
    (directory / step).touch()
    return directory / step


def kill_workers(gw, timeout_s: float = 10.0) -> list[int]:
    """Every worker of a LocalGateway dies, as in an endpoint restart; returns once each has
    exited as a whole (the kill alone does not mean the next call finds it gone). Waits on
    pidfds: /proc shows a killed worker's main thread a zombie while its other threads
    still exit, and until they have, the pool (rightly) sees it alive. Returns the pids."""
    pids = gw.worker_pids()
    assert pids, "no worker to kill: the gateway was never called"
    pidfds = [os.pidfd_open(pid) for pid in pids]
    try:
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        left = set(pidfds)
        while left:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"workers {pids} outlived SIGKILL"
            for fd, _ in poller.poll(math.ceil(remaining * 1000)):
                poller.unregister(fd)
                left.discard(fd)
    finally:
        for fd in pidfds:
            os.close(fd)
    return pids
