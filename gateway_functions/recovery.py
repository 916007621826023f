"""Gateway recovery: undo the work of dead workers, reconcile state with what runs,
expire leases. Every gateway function runs :meth:`Recovery.reap` first.

A worker can die anywhere (killed by its endpoint, the OOM killer, a client's
timeout). So ``reserve`` and ``connect`` record which worker is working on a stream
(``busy``) before they start or change a proxy, and clear it with the outcome; the
next call on the gateway undoes the work of a dead one (:meth:`Recovery.reap_abandoned`).
The first call in each worker process also reconciles the state with what runs
(:meth:`Recovery.reconcile`): after a restart, proxies that died are recorded as such,
and what runs or lies in the state directory without a stream is removed.
docs/faults.md describes each fault and what survives it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from scistream_gateway.protocol import State
from scistream_proxy.backends import ProxyBackend, ProxyUnavailable, get_backend
from scistream_proxy.leaks import working_dirs
from scistream_proxy.native_backend import NativeBackend
from scistream_proxy.process import ProcessIdentity, terminate

__all__ = ["Recovery", "busy_alive"]

# State directories this worker process has reconciled (its first call on each).
# Module state on purpose: "once per worker process" is exactly its lifetime.
_RECONCILED: set[str] = set()


def busy_alive(busy: dict | None) -> bool:
    """Whether the worker a ``busy`` mark names still runs."""
    return busy is not None and ProcessIdentity(int(busy["pid"]),
                                                int(busy["start_time"])).alive()


class Recovery:
    """The recovery half of :class:`~scistream_gateway.service.Gateway` (its base):
    uses the gateway's ``settings``, ``store``, ``streams_dir``, ``stream_dir``,
    ``_lookup`` and ``_cleanup``."""

    def backend(self, name: str) -> ProxyBackend:
        """Backend ``name`` as this gateway's settings configure it."""
        return get_backend(name, self.settings.backend_options())

    def reap(self) -> list[str]:
        """What every call does first: undo the work of workers that died mid-reserve or
        mid-connect, reconcile once per worker process, release every stream whose lease
        has expired. Returns the uids whose lease expired."""
        self.reap_abandoned()
        self.reconcile()
        now = time.time()
        if not self.store.expired(now):  # the common case: a read, no write lock
            return []
        with self.store.transaction():
            uids = []
            for uid in self.store.expired(now):
                try:
                    self._cleanup(self._lookup(uid), State.EXPIRED, "lease expired")
                except ProxyUnavailable:
                    continue  # its container engine is away: reaped by a later call
                uids.append(uid)
        return uids

    def reap_abandoned(self) -> list[str]:
        """Undo reserves and connects whose worker died (``busy`` names a dead process):
        a STARTING stream is forgotten, whatever its worker may have started removed
        (``abandon``) and its ports freed; a stream whose connect died turns FAILED
        with its proxy stopped and its resources freed. Returns their uids."""
        candidates = [st for st in self.store.busy_streams() if not busy_alive(st.busy)]
        if not candidates:
            return []
        undone = []
        with self.store.transaction():
            for stale in candidates:
                stream = self.store.get(stale.uid)
                if stream is None or stream.busy is None or stream.busy != stale.busy:
                    continue  # its call finished, or another worker got here first
                backend = self.backend(stream.backend)
                directory = self.stream_dir(stream.uid)
                try:
                    if stream.proxy is not None:
                        backend.stop(stream.proxy, directory)
                    backend.abandon(directory, stream.uid)
                except ProxyUnavailable:
                    continue  # its container engine is away: a later call does it
                shutil.rmtree(directory, ignore_errors=True)
                if stream.state == State.STARTING:
                    self.store.delete(stream.uid)
                else:
                    # Its proxy was stopped above (by its handle and by abandon).
                    self._cleanup(replace(stream, proxy=None), State.FAILED,
                                  f"the worker running connect died (pid {stream.busy['pid']})")
                undone.append(stream.uid)
        if undone:
            self._note(f"undid the reserve/connect of dead workers: {undone}")
        return undone

    def reconcile(self, force: bool = False) -> dict:
        """Make the state match what runs: once per worker process (its first call on
        this gateway), since a new worker may follow a restart of the endpoint or of the
        node. Streams whose proxy is gone turn FAILED with their resources freed;
        processes, relay streams, containers and stream directories that belong to no
        stream are removed. Returns what was done (for tests and the log)."""
        key = str(self.settings.state_dir)
        done: dict = {"failed": [], "orphans": []}
        if key in _RECONCILED and not force:
            return done
        with self.store.transaction():
            live = self._live_uids()
            for stream in self.store.active_streams(State.ACTIVE):
                if stream.state == State.FAILED or stream.busy is not None or stream.proxy is None:
                    continue
                try:
                    alive = self.backend(stream.backend).status(
                        stream.proxy, self.stream_dir(stream.uid))["alive"]
                except ProxyUnavailable:
                    continue
                if not alive:
                    # stop() of a dead proxy still removes what it left (nginx workers).
                    self._cleanup(stream, State.FAILED,
                                  "proxy not running when the gateway reconciled its state")
                    live.discard(stream.uid)
                    done["failed"].append(stream.uid)
            done["orphans"] = self._remove_orphans(live)
            self.store.free_stray_ports()
        _RECONCILED.add(key)
        if done["failed"] or done["orphans"]:
            self._note(f"reconciled (worker {os.getpid()}): streams whose proxy was gone, "
                      f"now FAILED: {done['failed']}; removed: {done['orphans']}")
        return done

    def _note(self, line: str) -> None:
        """A line for the operator in ``<state_dir>/gateway.log``."""
        self.settings.log(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {line}")

    def _live_uids(self) -> set[str]:
        """Streams that may own a proxy, ports and files: in a holding state, not FAILED
        (a FAILED stream's proxy was stopped or died; its files go at release)."""
        return {uid for uid, state in self.store.all_uids().items()
                if state in State.LIVE}

    def _remove_orphans(self, live: set[str]) -> list[str]:
        """Inside a transaction (so no reserve records a stream meanwhile): remove
        what belongs to no live stream. Returns a description of each thing removed."""
        removed = []
        states = self.store.all_uids()
        kept = live | {uid for uid, state in states.items() if state == State.FAILED}
        # Processes working in a stream directory: port holders, stunnel, HAProxy, nginx.
        for pid, cwd in working_dirs(self.streams_dir).items():
            parts = Path(cwd).relative_to(self.streams_dir).parts
            identity = ProcessIdentity.of(pid)
            if parts and parts[0] not in live and identity is not None:
                uid = parts[0]
                terminate(identity, grace_s=0)
                removed.append(f"process {pid} in streams/{uid}")
        # Streams the gateway's native relay holds (never the relay itself: it serves
        # the live ones, and exits by itself when the last one leaves).
        for uid in NativeBackend.relay_streams(self.settings.state_dir) or []:
            if uid not in live:
                self.backend("native").abandon(self.stream_dir(uid), uid)
                removed.append(f"relay stream {uid}")
        # Containers labelled with one of this gateway's stream directories.
        backends = {self.backend(self.settings.backend)} | {
            self.backend(st.backend) for st in self.store.active_streams()}
        for backend in backends:
            try:
                for uid in backend.orphans(self.streams_dir, live):
                    removed.append(f"{backend.name} container of {uid}")
            except ProxyUnavailable:
                pass  # no engine to ask: the next worker's first call tries again
        # Stream directories (keys, configs) of no stream that may still use them.
        for directory in self.streams_dir.iterdir():
            if directory.name not in kept:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(f"directory streams/{directory.name}")
        return removed
