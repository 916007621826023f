"""Sealed frames: the native relays' own record layer, keyed inside a pinned TLS 1.3 hop.

Two native relays (and only they: a C proxy never offers it) agree on it in the TLS
handshake by ALPN (:data:`ALPN`, which names the format's version). The handshake stays
TLS 1.3 with mutual pinning; then each side sends one TLS record of :data:`HELLO_MAGIC`
+ 32 random bytes. The randoms travel encrypted and authenticated by the pinned TLS
session, so only the two pinned ends know what is derived from them; a fresh pair per
connection gives every connection its own keys. The key schedule follows TLS 1.3's
(RFC 8446 7.1-7.3), with HKDF-SHA256 (RFC 5869):

    traffic secret (per direction) = HKDF(salt = "scistream-frames/2",
        ikm = client random | server random,
        info = "scistream-frames/2 client to server" | "... server to client", 32)
    key = HKDF-Expand(secret, "scistream-frames/2 key", 16)     AES-128-GCM
    iv  = HKDF-Expand(secret, "scistream-frames/2 iv", 12)
    next secret = HKDF-Expand(secret, "scistream-frames/2 key update", 32)

From then on the TCP socket carries frames, not TLS records:

    header (4 bytes, big-endian): payload length | FINAL (bit 31)
    ciphertext (payload length bytes) | GCM tag (16 bytes)

- the header is the AEAD's associated data, so length and FINAL are authenticated;
- the nonce is the key's IV XOR the frame's sequence number under that key (as TLS
  1.3's, RFC 8446 5.3): a dropped, repeated, reordered or altered frame fails
  authentication, and no two connections share nonces;
- an empty FINAL frame ends a direction (as TLS close_notify does); anything after it,
  or the TCP stream ending without it, fails the connection (the relay resets its app
  rather than end it cleanly);
- a payload is at most :data:`FRAME_MAX` (1 MiB): a larger length is refused before
  anything is read into memory;
- a direction's secret is replaced by the next one every :data:`REKEY_FRAMES` frames (at
  most 64 GiB per key, below the volume TLS 1.3 allows one AES-GCM key, RFC 8446 5.5),
  on both ends in step; key and IV are derived anew and the sequence restarts at 0.

Why: TLS records carry at most 16 KiB, and OpenSSL on a socket makes one write(2) per
record and two read(2)s per record; a relay in Python pays for each. Frames of up to
1 MiB are sealed in place with one AES-GCM call per frame and move with one send(2) /
a few recv(2)s. Each direction has its own key, nonce and buffer, so the two
directions share no state (unlike an SSL object, which must not be used by two threads
at once) and may run in different threads or in a pump (``scistream_proxy.engines``,
``scistream_proxy.pump``). AES-GCM runs in ``cryptography``'s AESGCM, in place
(``encrypt_into`` / ``decrypt_into``, cryptography 47 on), which releases the GIL.
"""

from __future__ import annotations

import mmap
import os
import ssl
import time

ALPN = "scistream-frames/2"
HELLO_MAGIC = b"SSF2"
HELLO_SIZE = len(HELLO_MAGIC) + 32
FRAME_MAX = 1 << 20
FINAL = 1 << 31
HEADER = 4
TAG = 16
REKEY_FRAMES = 1 << 16
SECRET_SIZE = 32
KEY_SIZE = 16
IV_SIZE = 12
_LABEL = ALPN.encode()  # every derivation names the version, so versions never share keys


class FrameError(ConnectionError):
    """The frames hop broke its protocol: failed authentication, a bad header or hello,
    data after the end, or the TCP stream ending without an end frame."""


def _expand(secret: bytes, label: bytes, length: int) -> bytes:
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    return HKDFExpand(SHA256(), length, _LABEL + b" " + label).derive(secret)


def traffic_secrets(client_random: bytes, server_random: bytes) -> tuple[bytes, bytes]:
    """(client -> server secret, server -> client secret) from both ends' randoms."""
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def secret(direction: bytes) -> bytes:
        return HKDF(SHA256(), SECRET_SIZE, _LABEL, _LABEL + b" " + direction).derive(
            client_random + server_random)

    return secret(b"client to server"), secret(b"server to client")


def key_and_iv(secret: bytes) -> tuple[bytes, bytes]:
    """The AES-128-GCM key and the 12-byte IV of a traffic secret."""
    return _expand(secret, b"key", KEY_SIZE), _expand(secret, b"iv", IV_SIZE)


def next_secret(secret: bytes) -> bytes:
    """The traffic secret that replaces ``secret`` at a key update."""
    return _expand(secret, b"key update", SECRET_SIZE)


class Cipher:
    """One direction's AES-128-GCM: its traffic secret, key, IV and sequence number, and
    the key update every :data:`REKEY_FRAMES` frames."""

    def __init__(self, secret: bytes, encrypt: bool):
        # Imported here, not with the module: off the relay's start (the first reserve).
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.invalid_tag, self.aesgcm = InvalidTag, AESGCM
        self.encrypt = encrypt
        self._install(secret)

    def _install(self, secret: bytes) -> None:
        key, iv = key_and_iv(secret)
        self.secret, self.seq = secret, 0
        self.iv = int.from_bytes(iv, "big")
        self.aead = self.aesgcm(key)

    def run(self, buf: _Buffer, length: int) -> None:
        """Seal or open the frame at the start of ``buf`` (header | ``length`` bytes of
        payload | tag) in place; the header is authenticated. Raises FrameError if
        opening fails."""
        if self.seq == REKEY_FRAMES:
            self._install(next_secret(self.secret))
        nonce = (self.iv ^ self.seq).to_bytes(IV_SIZE, "big")
        self.seq += 1
        view = buf.view
        header = bytes(view[:HEADER])
        end = HEADER + length
        try:
            if self.encrypt:
                self.aead.encrypt_into(nonce, view[HEADER:end], header, view[HEADER:end + TAG])
            else:
                self.aead.decrypt_into(nonce, view[HEADER:end + TAG], header, view[HEADER:end])
        except self.invalid_tag:
            raise FrameError("a frame failed authentication (altered, dropped, replayed "
                             "or reordered)") from None


class _Buffer:
    """A frame buffer: anonymous memory, so pages a connection never fills cost nothing."""

    def __init__(self, size: int):
        self.mem = mmap.mmap(-1, size)
        self.view = memoryview(self.mem)

    def close(self) -> None:
        self.view.release()
        self.mem.close()


def exchange(tls: ssl.SSLSocket, timeout: float) -> tuple[bytes, bytes]:
    """Agree on the frames' traffic secrets over a TLS hop that negotiated :data:`ALPN`;
    returns (secret to seal with, secret to open with). OpenSSL reads no further than
    the record it needs (no read-ahead), so the frames that follow stay in the socket;
    bytes after the hello inside its TLS record would be lost with the SSL object, so
    they are refused."""
    mine = os.urandom(32)
    deadline = time.monotonic() + timeout
    tls.settimeout(timeout)
    tls.sendall(HELLO_MAGIC + mine)
    got = b""
    while len(got) < HELLO_SIZE:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("frames key exchange timed out")
        tls.settimeout(remaining)
        data = tls.recv(HELLO_SIZE - len(got))
        if not data:
            raise FrameError("the peer closed the TLS hop during the frames key exchange")
        got += data
    if not got.startswith(HELLO_MAGIC):
        raise FrameError(f"the peer's frames hello is not {ALPN}'s")
    if tls.pending():
        raise FrameError("data after the frames hello in its TLS record")
    theirs = got[len(HELLO_MAGIC):]
    if tls.server_side:
        to_server, to_client = traffic_secrets(theirs, mine)
        return to_client, to_server
    return traffic_secrets(mine, theirs)
