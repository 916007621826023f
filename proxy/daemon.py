"""The started program's side of ``scistream_proxy.process.spawn_detached``: fork away,
then report ready on the ready pipe.

Apart from ``process`` so that a relay, which imports this on every start, does not
import what starting and stopping proxies needs (``subprocess``, ``shutil``,
``dataclasses``: about 20 ms of a relay's start, which is on every first ``reserve``).
"""

from __future__ import annotations

import json
import os
import signal


def ready_reporter(ready_fd: int):
    """The program's side of the ``spawn_detached`` handshake: ``report(message)``
    writes the one JSON line on ``ready_fd`` (``{"pid": P}`` or ``{"error": "..."}``)
    and closes it; nothing if ``ready_fd`` is negative (started by hand)."""

    def report(message: dict) -> None:
        if ready_fd >= 0:
            os.write(ready_fd, json.dumps(message).encode() + b"\n")
            os.close(ready_fd)

    return report


def become_daemon(ready_fd: int, *, foreground: bool = False):
    """Fork away from the starter (which the gateway reaps; the daemon is reparented
    and outlives it) unless ``foreground``, ignore SIGHUP, and return the
    :func:`ready_reporter` of ``ready_fd``."""
    if not foreground and os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return ready_reporter(ready_fd)
