"""The wire layer: JSON in, JSON out, expected failures returned as ``{"error": ...}``.

Gateway functions must never raise into Globus Compute: an exception there becomes an
opaque remote traceback. Expected failures carry their SciStream code; anything else
is logged with its traceback in the gateway's state directory and returned as
``SERVER_ERR`` with a reference the operator can find in that log.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import traceback

from scistream_gateway.errors import NotImplementedHere, SciStreamError, ServerError, Unavailable
from scistream_gateway.protocol import FUNCTIONS
from scistream_gateway.service import Gateway
from scistream_gateway.settings import load_settings

__all__ = ["handle"]

log = logging.getLogger("scistream_gateway")


def handle(function: str, request: object) -> dict:
    """Run gateway function ``function`` on ``request`` with this gateway's settings."""
    settings = None
    try:
        if function not in FUNCTIONS:
            raise NotImplementedHere(f"no gateway function {function!r}; known: {list(FUNCTIONS)}")
        settings = load_settings()
        with Gateway(settings) as gateway:
            return getattr(gateway, function)(request)
    except SciStreamError as exc:
        return exc.to_wire()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            # Every worker of this gateway waits its turn for the write lock (60 s);
            # past that the gateway is overloaded, which a client may retry later.
            return Unavailable(f"gateway state is busy ({exc}); try again").to_wire()
        return _server_error(function, settings)
    except Exception:  # noqa: BLE001 - the wire never carries a raw traceback
        return _server_error(function, settings)


def _server_error(function: str, settings) -> dict:
    """Log the current exception where the operator finds it; reply with a reference."""
    ref = secrets.token_hex(4)
    detail = traceback.format_exc()
    if settings is not None:
        settings.log(f"[{ref}] {function}\n{detail}")
    log.error("gateway function %s failed [%s]\n%s", function, ref, detail)
    return ServerError(f"internal error in {function} (gateway log reference {ref})").to_wire()
