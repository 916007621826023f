"""Who owns a stream: the client key, and the per-stream secrets derived from it.

Whoever holds the client key controls the streams it opened: the same user on the
same machine (the key file), or a worker given the same key in ``SCISTREAM_CLIENT_KEY``
(for example from a Prefect Secret). Nothing per stream is stored on the client:
a stream's control secret is HMAC-SHA256(client key, ``"scistream control\\0" + uid``),
and the gateway keeps only its SHA-256. Stdlib only: the command line imports this
before anything heavy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from scistream_gateway.errors import BadFormat

__all__ = ["CLIENT_KEY_ENV", "CONFIG_DIR_ENV", "client_key", "control_secret", "key_path",
           "owner_token", "sha256_hex", "with_proofs"]

CLIENT_KEY_ENV = "SCISTREAM_CLIENT_KEY"  # base64url of 32 bytes; wins over the key file
CONFIG_DIR_ENV = "SCISTREAM_CONFIG_DIR"  # default ~/.config/scistream
KEY_BYTES = 32

# The calls that prove the stream's control secret (``reserve`` gives its hash instead).
_CONTROLLED = frozenset({"wait_hello", "connect", "status", "renew", "release"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise BadFormat(f"{where} must be {KEY_BYTES} bytes in base64url "
                        f"({len(_b64(bytes(KEY_BYTES)))} characters)")
    return key


def key_path() -> Path:
    """Where the client key file is: ``$SCISTREAM_CONFIG_DIR/client.key``."""
    base = os.environ.get(CONFIG_DIR_ENV) or Path.home() / ".config" / "scistream"
    return Path(base).expanduser() / "client.key"


def client_key() -> bytes:
    """The 32-byte client key: from ``SCISTREAM_CLIENT_KEY`` if set, else the key file,
    created on first use (mode 0600, in a 0700 directory).

    Raises:
        BadFormat: the variable is not 32 bytes of base64url, or the key file is
            readable by others, not this user's, or not a key.
    """
    value = os.environ.get(CLIENT_KEY_ENV)
    if value:
        return _unb64(value, CLIENT_KEY_ENV)
    path = key_path()
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            _create(path)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise BadFormat(f"cannot read or create the client key {path}: "
                        f"{exc.strerror or exc}") from None
    with open(fd, "rb") as fh:
        # Checked on the open file, so a swap after the check cannot slip through.
        info = os.fstat(fh.fileno())
        if info.st_uid != os.getuid():
            raise BadFormat(f"client key {path} belongs to uid {info.st_uid}, not to you "
                            f"(uid {os.getuid()}); remove it")
        if info.st_mode & 0o077:
            raise BadFormat(f"client key {path} is open to others (mode "
                            f"{info.st_mode & 0o777:o}); run chmod 600 {path}")
        text = fh.read(1024).decode(errors="replace")
    return _unb64(text, f"client key {path}")


def _create(path: Path) -> None:
    """Write a new key at ``path`` unless another process got there first: the key is
    written to a private temporary file, then linked into place (``link`` fails if the
    name exists), so every process ends with the same complete key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".client.key.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(fd, "w") as fh:
            fh.write(_b64(secrets.token_bytes(KEY_BYTES)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process's key won: use that one
    finally:
        temporary.unlink(missing_ok=True)


def _mac(label: bytes) -> str:
    return _b64(hmac.new(client_key(), label, hashlib.sha256).digest())


def control_secret(uid: str) -> str:
    """The control secret of stream ``uid``: 43 characters of base64url."""
    return _mac(b"scistream control\0" + uid.encode())


def owner_token() -> str:
    """What names this client's streams to ``list_streams``: 43 characters of base64url."""
    return _mac(b"scistream owner\0")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def with_proofs(verb: str, request: dict) -> dict:
    """``request`` with the proofs gateway function ``verb`` needs added (a new dict; a
    field the request already has is kept): ``control_sha256`` and ``owner_sha256``
    for ``reserve``, ``control`` for the calls on a stream, ``owner`` for
    ``list_streams``. A request without a string uid is left for the gateway to refuse."""
    if not isinstance(request, dict):
        return request
    uid = request.get("uid")
    if verb == "list_streams":
        return {"owner": owner_token(), **request}
    if not isinstance(uid, str):
        return dict(request)
    if verb == "reserve":
        return {"control_sha256": sha256_hex(control_secret(uid)),
                "owner_sha256": sha256_hex(owner_token()), **request}
    if verb in _CONTROLLED:
        return {"control": control_secret(uid), **request}
    return dict(request)
