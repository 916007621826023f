"""What gateway tests share: a reservation in one call, a planted fault, and every worker
of a LocalGateway killed as an endpoint restart kills them."""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid
from pathlib import Path

from scistream_gateway.engine import EndpointEngine
from scistream_gateway.settings import CONFIG_ENV
from scistream_prefect.ownership import with_proofs
from scistream_proxy.process import ProcessIdentity


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
    """Every worker of a LocalGateway dies, as in an endpoint restart; returns once each is
    dead (the kill alone does not mean the next call finds it gone). Returns their pids."""
    pids = gw.worker_pids()
    assert pids, "no worker to kill: the gateway was never called"
    identities = [ProcessIdentity.of(pid) for pid in pids]
    for pid in pids:
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(i is not None and i.alive() for i in identities):
        assert time.monotonic() < deadline, f"workers {pids} outlived SIGKILL"
        time.sleep(0.01)
    return pids
