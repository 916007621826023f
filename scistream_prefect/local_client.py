"""A local gateway reached without Prefect: its shipped functions run in this process.

The command line's way to a gateway named by its settings file. A call runs the same
shipped function (``scistream_gateway.functions``) with the same request checks that
a worker of :class:`~scistream_prefect.gateways.LocalGateway` runs; the request and the
reply make the JSON round trip of the wire. What it leaves out is the worker process:
its first call imports the Globus Compute serializer on both sides, one after the other
(0.74 s of CPU in the client, 0.81 s in the worker with the gateway's code, measured
here), more than a whole one-shot command may take (``bench/cli.py``), and a one-shot
command is itself the process that isolates the call. Long-lived clients (flows,
notebooks) keep the block's workers, which bound a call by a timeout and survive a
Ctrl-C.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from scistream_prefect.ownership import with_proofs

__all__ = ["LocalClient"]

# A gateway function reads its settings from the environment (as on an endpoint), so
# calls in this process take turns: one gateway's settings at a time.
_TURN = threading.Lock()


@dataclass(frozen=True)
class LocalClient:
    """One local gateway, named by its settings file (``gateway.toml``).

    Example:
        ```python
        from scistream_prefect.local_client import LocalClient

        gw = LocalClient("/srv/gateway-p/gateway.toml")
        gw.call("gateway_info", {})["free_ports"]
        ```
    """

    settings_path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings_path", Path(self.settings_path).expanduser().resolve())

    @property
    def settings(self):
        from scistream_gateway.settings import GatewaySettings

        return GatewaySettings.from_toml(self.settings_path)

    @property
    def label(self) -> str:
        return f"local:{self.settings.name}"  # as LocalGateway labels it

    def call(self, function: str, request: dict, timeout_s: float | None = None) -> dict:
        """Run gateway function ``function`` on ``request``; raise its error, if any.

        ``timeout_s`` is accepted for the gateway interface and not enforced: the call
        runs in this process to its end (``wait_hello`` is bounded by the gateway).
        """
        from scistream_gateway.errors import BadFormat, error_from_wire
        from scistream_gateway.functions import ALL
        from scistream_gateway.protocol import FUNCTIONS
        from scistream_gateway.settings import CONFIG_ENV

        if function not in FUNCTIONS:  # as the other gateways say it
            raise BadFormat(f"no gateway function {function!r:.80}; known: {sorted(FUNCTIONS)}")
        try:
            sent = json.dumps(with_proofs(function, request))
        except (TypeError, ValueError, RecursionError) as exc:
            raise BadFormat(f"{function} request does not serialize: {exc}") from None
        with _TURN:
            saved = os.environ.get(CONFIG_ENV)
            os.environ[CONFIG_ENV] = str(self.settings_path)
            try:
                reply = json.loads(json.dumps(ALL[function](json.loads(sent))))
            finally:
                if saved is None:
                    os.environ.pop(CONFIG_ENV, None)
                else:
                    os.environ[CONFIG_ENV] = saved
        error = error_from_wire(reply)
        if error is not None:
            raise error
        return reply
