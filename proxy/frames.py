"""Sealed frames: the native relays' own record layer, keyed inside a pinned TLS 1.3 hop.

Two native relays (and only they: a C proxy never offers it) agree on it in the TLS
handshake by ALPN (:data:`ALPN`). The handshake stays TLS 1.3 with mutual pinning; then
each side sends one TLS record of :data:`HELLO_MAGIC` + 32 random bytes, and both derive
one AES-128-GCM key per direction from the two randoms (HKDF-SHA256, RFC 5869). The
randoms travel encrypted and authenticated by the pinned TLS session, so only the two
pinned ends know the keys; a fresh pair per connection means a key never meets the same
nonce twice. From then on the TCP socket carries frames, not TLS records:

    header (4 bytes, big-endian): payload length | FINAL (bit 31)
    ciphertext (payload length bytes) | GCM tag (16 bytes)

- the header is the AEAD's associated data, so length and FINAL are authenticated;
- the nonce is the frame's sequence number in its direction (96 bits, from 0): a
  dropped, repeated, reordered or altered frame fails authentication;
- an empty FINAL frame ends a direction (as TLS close_notify does); the TCP stream
  ending without it is a truncation, and the relay resets its app rather than end it
  cleanly;
- a payload is at most :data:`FRAME_MAX` (1 MiB): a larger length is refused before
  anything is read into memory;
- the key of a direction is replaced every :data:`REKEY_FRAMES` frames (at most 64 GiB
  per key, below the volume TLS 1.3 allows one AES-GCM key, RFC 8446 5.5) by
  HKDF-Expand of the old key, on both ends in step.

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

import hashlib
import hmac
import mmap
import os
import ssl
import time

ALPN = "scistream-frames/1"
HELLO_MAGIC = b"SSF1"
HELLO_SIZE = len(HELLO_MAGIC) + 32
FRAME_MAX = 1 << 20
FINAL = 1 << 31
HEADER = 4
TAG = 16
REKEY_FRAMES = 1 << 16
KEY_SIZE = 16
_SALT = b"scistream frames v1"
_NONCE_PREFIX = bytes(4)  # nonce: 4 zero bytes | 64-bit sequence number


class FrameError(ConnectionError):
    """The frames hop broke its protocol: failed authentication, a bad header,
    data after the end, or the TCP stream ending without an end frame."""


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def derive_keys(client_random: bytes, server_random: bytes) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key) from both ends' randoms."""
    prk = hmac.new(_SALT, client_random + server_random, hashlib.sha256).digest()
    return (_hkdf_expand(prk, b"client to server", KEY_SIZE),
            _hkdf_expand(prk, b"server to client", KEY_SIZE))


def next_key(key: bytes) -> bytes:
    return _hkdf_expand(key, b"key update", KEY_SIZE)


class Cipher:
    """One direction's AES-128-GCM: the sequence number, the nonce it makes, and the key
    update every :data:`REKEY_FRAMES` frames."""

    def __init__(self, key: bytes, encrypt: bool):
        # Imported here, not with the module: off the relay's start (the first reserve).
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.invalid_tag = InvalidTag
        self.key, self.encrypt, self.seq = key, encrypt, 0
        self.aead = AESGCM(key)

    def run(self, buf: _Buffer, length: int) -> None:
        """Seal or open the frame at the start of ``buf`` (header | ``length`` bytes of
        payload | tag) in place; the header is authenticated. Raises FrameError if
        opening fails."""
        if self.seq and self.seq % REKEY_FRAMES == 0:
            self.key = next_key(self.key)
            self.aead = type(self.aead)(self.key)
        nonce = _NONCE_PREFIX + self.seq.to_bytes(8, "big")
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
    """Agree on the frame keys over a TLS hop that negotiated :data:`ALPN`; returns
    (key to seal with, key to open with). OpenSSL reads no further than the record it
    needs (no read-ahead), so the frames that follow stay in the socket."""
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
        raise FrameError("the peer's frames hello is malformed")
    theirs = got[len(HELLO_MAGIC):]
    if tls.server_side:
        to_client, to_server = derive_keys(theirs, mine)[::-1]
        return to_client, to_server
    return derive_keys(mine, theirs)
