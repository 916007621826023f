"""The app controller's side (SciStream's appctrl): say hello to a gateway, learn listeners.

A producer app's controller proves it knows the stream's hello key and tells its gateway
where the app listens; a consumer app's controller proves the same and learns where its
app connects. No Prefect flow is needed: each is one gateway call, usable from any
Python program next to the app, and from ``scistream hello``.

The key is a secret: it is read from a file (owner-only, like an SSH key), from standard
input, or from the ``SCISTREAM_HELLO_KEY`` environment variable, never from a command
line (which other users of the machine can read in ``/proc``).

Example::

    from scistream_prefect.hello import read_hello_key, resolve_gateway, send_hello

    gw = resolve_gateway("/srv/gateway-p/gateway.toml")      # or a saved block's name
    key = read_hello_key(key_file="~/.scistream/stream.key")
    send_hello(gw, uid, key, app_listeners=["10.0.0.5:5074"])  # producer
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from pydantic import SecretStr

from scistream_gateway.errors import BadFormat
from scistream_prefect import streams_core as core
from scistream_prefect.local_client import LocalClient

__all__ = ["HELLO_KEY_ENV", "consumer_listeners", "read_hello_key", "resolve_gateway",
           "send_hello"]

HELLO_KEY_ENV = "SCISTREAM_HELLO_KEY"


def resolve_gateway(spec: str):
    """A gateway from a local gateway's settings file path or a saved block's name.

    ``spec`` is a path to a gateway TOML file (a local gateway, called in this process
    without Prefect: :class:`~scistream_prefect.local_client.LocalClient`), a saved
    block's name
    (``facility-p``: a Globus Compute gateway block of that name, else a local one), or
    ``<block-type-slug>/<name>``.

    Raises:
        BadFormat: no such file and no such block.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return LocalClient(path)
    if spec.endswith(".toml") or spec.startswith((".", os.sep, "~")):
        raise BadFormat(f"no gateway settings file {spec!r}")
    from prefect.blocks.core import Block

    from scistream_prefect.compute import GlobusComputeGateway
    from scistream_prefect.gateways import LocalGateway

    if "/" in spec:
        candidates = [lambda: Block.load(spec)]
    else:
        candidates = [lambda: GlobusComputeGateway.load(spec),
                      lambda: LocalGateway.load(spec)]
    for load in candidates:
        try:
            block = load()
        except ValueError:
            continue
        if not hasattr(block, "call"):
            raise BadFormat(f"block {spec!r} is a {type(block).__name__}, not a gateway")
        return block
    raise BadFormat(f"no gateway settings file and no saved gateway block named {spec!r}")


def read_hello_key(key_file: str | os.PathLike | None = None, *, stdin: bool = False,
                   environ: dict | None = None) -> SecretStr:
    """The hello key from a file, standard input, or ``SCISTREAM_HELLO_KEY``, in that order.

    A key file must be readable by its owner only (mode 0600 or stricter).

    Raises:
        BadFormat: no key given, an empty key, or a key file others can read.
    """
    environ = os.environ if environ is None else environ
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise BadFormat(f"key file {path} is readable by others (mode "
                                f"{stat.S_IMODE(mode):o}): chmod 600 it")
            key = path.read_text()
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path, not UTF-8
            raise BadFormat(f"cannot read key file {path}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    elif stdin:
        key = sys.stdin.readline()
    else:
        key = environ.get(HELLO_KEY_ENV, "")
        if not key:
            raise BadFormat(f"no hello key: give a key file, standard input, or set "
                            f"{HELLO_KEY_ENV}")
    key = key.strip()
    if not key:
        raise BadFormat("the hello key is empty")
    return SecretStr(key)


def send_hello(gateway, uid: str, hello_key: SecretStr | str,
               app_listeners: list[str]) -> list[str]:
    """The producer's hello: where its app listens. Returns the producer gateway's listeners.

    Raises:
        AuthError: wrong key. InvalidUid: no such stream (or not waiting for a hello).
    """
    return _hello(gateway, uid, hello_key, "PROD", list(app_listeners))


def consumer_listeners(gateway, uid: str, hello_key: SecretStr | str) -> list[str]:
    """The consumer's hello: where the consumer app connects (its gateway's listeners).

    Raises:
        AuthError: wrong key. InvalidUid: no such stream.
    """
    return _hello(gateway, uid, hello_key, "CONS", None)


def _hello(gateway, uid: str, hello_key: SecretStr | str, role: str,
           app_listeners: list[str] | None) -> list[str]:
    return core.hello(gateway, uid, hello_key, role, app_listeners).listeners
