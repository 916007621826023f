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
at once) and may run in different threads (the loops here) or in a pump
(``scistream_proxy.pump``). AES-GCM runs in ``cryptography``'s AESGCM where it can seal
in place (its wheel carries a recent OpenSSL: over twice as fast here as Debian's 3.0),
else in the ``ssl`` module's ``libcrypto`` through ``ctypes`` (see :data:`AEAD_ENV`);
both release the GIL for the payload. Where neither can run, the relay does not offer
the ALPN name and TLS records are used.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import mmap
import os
import socket
import ssl
import struct
import threading
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

_EVP_CTRL_GCM_SET_IVLEN = 0x9
_EVP_CTRL_GCM_GET_TAG = 0x10
_EVP_CTRL_GCM_SET_TAG = 0x11


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


# Which AES-GCM implementation seals and opens frames: "auto" (the default:
# "cryptography" where it can seal in place, else "libcrypto"), "cryptography" (the
# ``cryptography`` package's AESGCM, ``encrypt_into``/``decrypt_into``, with the OpenSSL
# its wheel carries) or "libcrypto" (the ``ssl`` module's OpenSSL through ``ctypes``).
# Measured here (1 MiB frames, in place): cryptography 50 (OpenSSL 4.0) 13-16 GB/s,
# Debian's OpenSSL 3.0 through ctypes 6 GB/s. Both write the same frames.
AEAD_ENV = "SCISTREAM_NATIVE_AEAD"
_NONCE_PREFIX = bytes(4)  # nonce: 4 zero bytes | 64-bit sequence number

_lib: ctypes.CDLL | None | bool = False  # False: not loaded yet
_bulk: ctypes.CDLL | None = None
_lib_missing = ""


def _libcrypto_path() -> str | None:
    """The libcrypto mapped into this process by the ``ssl`` module, so frames use the
    same OpenSSL build as the TLS handshake."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libcrypto.so" in path:
                    return path
    except OSError:
        return None
    return None


def libcrypto() -> ctypes.CDLL | None:
    """OpenSSL's libcrypto with the EVP calls :class:`EvpCipher` needs, or None.

    Two handles on the same library: calls through this one keep the GIL (the short
    ones: a nonce, the header, the tag take well under a microsecond, and with many
    connections each GIL hand-over is a futex round with every other thread), calls
    through the other release it (the payload: tens of microseconds or more, while
    other connections run)."""
    global _lib, _bulk, _lib_missing
    if _lib is False:
        path = _libcrypto_path()
        try:
            if path is None:
                raise OSError("the ssl module's libcrypto is not a shared library here")
            lib, bulk = ctypes.PyDLL(path), ctypes.CDLL(path)
            vp, ip, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
            lib.EVP_CIPHER_CTX_new.restype = vp
            lib.EVP_CIPHER_CTX_new.argtypes = []
            lib.EVP_CIPHER_CTX_free.argtypes = [vp]
            lib.EVP_aes_128_gcm.restype = vp
            lib.EVP_aes_128_gcm.argtypes = []
            lib.EVP_CipherInit_ex.argtypes = [vp, vp, vp, cp, vp, ip]
            for handle in (lib, bulk):
                handle.EVP_CipherUpdate.argtypes = [vp, vp, ctypes.POINTER(ip), vp, ip]
            lib.EVP_CipherFinal_ex.argtypes = [vp, vp, ctypes.POINTER(ip)]
            lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ip, ip, vp]
            _lib, _bulk = lib, bulk
        except (OSError, AttributeError) as exc:
            _lib, _lib_missing = None, f"OpenSSL's libcrypto: {exc}"
    return _lib  # type: ignore[return-value]


def _aesgcm():
    """``cryptography``'s AESGCM if it can seal and open in place (``encrypt_into``,
    ``decrypt_into``: cryptography 47 on), else None."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        return None
    return AESGCM if hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into") \
        else None


def engine() -> str | None:
    """The AES-GCM implementation frames use here (see :data:`AEAD_ENV`): "cryptography",
    "libcrypto", or None where neither can run (see :func:`missing`)."""
    wanted = os.environ.get(AEAD_ENV, "auto")
    if wanted in ("auto", "cryptography") and _aesgcm() is not None:
        return "cryptography"
    if wanted in ("auto", "libcrypto") and libcrypto() is not None:
        return "libcrypto"
    return None


def missing() -> str:
    """Why frames are not available here ('' when they are)."""
    if engine() is not None:
        return ""
    wanted = os.environ.get(AEAD_ENV, "auto")
    if wanted not in ("auto", "cryptography", "libcrypto"):
        return f"{AEAD_ENV}={wanted!r}: use auto, cryptography or libcrypto"
    reasons = []
    if wanted in ("auto", "cryptography"):
        reasons.append("the cryptography package with AESGCM.encrypt_into (47 or later)")
    if wanted in ("auto", "libcrypto"):
        libcrypto()
        reasons.append(_lib_missing)
    return "frames need " + " or ".join(reasons)


def Cipher(key: bytes, encrypt: bool) -> AeadCipher | EvpCipher:  # noqa: N802 (a factory)
    """One direction's AES-128-GCM, from the implementation :func:`engine` picks."""
    name = engine()
    if name is None:
        raise RuntimeError(missing())
    return (AeadCipher if name == "cryptography" else EvpCipher)(key, encrypt)


class _Rekeying:
    """What both implementations share: the sequence number, the nonce it makes, and
    the key update every :data:`REKEY_FRAMES` frames."""

    def __init__(self, key: bytes, encrypt: bool):
        self.key, self.encrypt, self.seq = key, encrypt, 0
        self._init(key)

    def _init(self, key: bytes) -> None:
        raise NotImplementedError

    def _next_nonce(self) -> int:
        """The sequence number of the frame about to be sealed or opened (its nonce),
        after updating the key if this frame starts a new one."""
        if self.seq and self.seq % REKEY_FRAMES == 0:
            self.key = next_key(self.key)
            self._init(self.key)
        self.seq += 1
        return self.seq - 1

    def close(self) -> None:
        pass

    @staticmethod
    def _refused() -> FrameError:
        return FrameError("a frame failed authentication (altered, dropped, replayed or "
                          "reordered)")


class AeadCipher(_Rekeying):
    """AES-128-GCM through ``cryptography``'s AESGCM, in place (it releases the GIL)."""

    def _init(self, key: bytes) -> None:
        self.aead = _aesgcm()(key)  # type: ignore[misc]

    def run(self, buf: _Buffer, length: int) -> None:
        """Seal or open the frame at the start of ``buf`` (header | ``length`` bytes of
        payload | tag) in place; the header is authenticated. Raises FrameError if
        opening fails."""
        nonce = _NONCE_PREFIX + self._next_nonce().to_bytes(8, "big")
        view = buf.view
        header = bytes(view[:HEADER])
        end = HEADER + length
        try:
            if self.encrypt:
                self.aead.encrypt_into(nonce, view[HEADER:end], header, view[HEADER:end + TAG])
            else:
                self.aead.decrypt_into(nonce, view[HEADER:end + TAG], header, view[HEADER:end])
        except _invalid_tag():
            raise self._refused() from None


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag
    return InvalidTag


class EvpCipher(_Rekeying):
    """AES-128-GCM through the ``ssl`` module's libcrypto (EVP calls through ctypes;
    the payload's call releases the GIL)."""

    def __init__(self, key: bytes, encrypt: bool):
        lib = libcrypto()
        if lib is None:
            raise RuntimeError(missing())
        self.lib = lib
        self.bulk_update = _bulk.EVP_CipherUpdate  # type: ignore[union-attr]
        self.ctx = lib.EVP_CIPHER_CTX_new()
        if not self.ctx:
            raise MemoryError("EVP_CIPHER_CTX_new")
        self.outl = ctypes.c_int(0)
        self._outl = ctypes.byref(self.outl)
        self._nonce = ctypes.create_string_buffer(12)  # 4 zero bytes | sequence number
        self._nonce_addr = ctypes.addressof(self._nonce)
        super().__init__(key, encrypt)

    def _init(self, key: bytes) -> None:
        lib = self.lib
        if lib.EVP_CipherInit_ex(self.ctx, lib.EVP_aes_128_gcm(), None, None, None,
                                 int(self.encrypt)) != 1 or \
                lib.EVP_CIPHER_CTX_ctrl(self.ctx, _EVP_CTRL_GCM_SET_IVLEN, 12, None) != 1 or \
                lib.EVP_CipherInit_ex(self.ctx, None, None, key, None, -1) != 1:
            raise FrameError("AES-128-GCM set-up failed")

    def close(self) -> None:
        if self.ctx:
            self.lib.EVP_CIPHER_CTX_free(self.ctx)
            self.ctx = None

    def run(self, buf: _Buffer, length: int) -> None:
        """As :meth:`AeadCipher.run`."""
        struct.pack_into(">Q", self._nonce, 4, self._next_nonce())
        lib, ctx, outl = self.lib, self.ctx, self._outl
        header = buf.addr
        payload, tag = header + HEADER, header + HEADER + length
        ok = lib.EVP_CipherInit_ex(ctx, None, None, None, self._nonce_addr, -1) == 1
        ok = ok and lib.EVP_CipherUpdate(ctx, None, outl, header, HEADER) == 1
        if length:  # the one long call: without the GIL
            ok = ok and self.bulk_update(ctx, payload, outl, payload, length) == 1
        if self.encrypt:
            ok = ok and lib.EVP_CipherFinal_ex(ctx, tag, outl) == 1
            ok = ok and lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_GET_TAG, TAG, tag) == 1
            if not ok:
                raise FrameError("sealing a frame failed")
        else:
            ok = ok and lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, TAG, tag) == 1
            if not ok or lib.EVP_CipherFinal_ex(ctx, tag, outl) != 1:
                raise self._refused()


class _Buffer:
    """A frame buffer: anonymous memory, so pages a connection never fills cost nothing."""

    def __init__(self, size: int):
        self.mem = mmap.mmap(-1, size)
        self.view = memoryview(self.mem)
        self._c = ctypes.c_char.from_buffer(self.mem)
        self.addr = ctypes.addressof(self._c)

    def close(self) -> None:
        del self._c
        self.view.release()
        self.mem.close()


def exchange(obj: ssl.SSLObject, raw: socket.socket, incoming: ssl.MemoryBIO,
             outgoing: ssl.MemoryBIO, timeout: float) -> tuple[bytes, bytes, bytes]:
    """Agree on the frame keys over a TLS hop that negotiated :data:`ALPN`.

    Returns (key to seal with, key to open with, raw bytes already received after the
    TLS hello record: the first frames)."""
    mine = os.urandom(32)
    obj.write(HELLO_MAGIC + mine)
    deadline = time.monotonic() + timeout
    raw.settimeout(max(0.001, deadline - time.monotonic()))
    raw.sendall(outgoing.read())
    got = b""
    while len(got) < HELLO_SIZE:
        try:
            got += obj.read(HELLO_SIZE - len(got))
            continue
        except ssl.SSLWantReadError:
            pass
        if outgoing.pending:
            raw.sendall(outgoing.read())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("frames key exchange timed out")
        raw.settimeout(remaining)
        data = raw.recv(65536)
        if not data:
            raise FrameError("the peer closed the TLS hop during the frames key exchange")
        incoming.write(data)
    if not got.startswith(HELLO_MAGIC):
        raise FrameError("the peer's frames hello is malformed")
    theirs = got[len(HELLO_MAGIC):]
    if obj.server_side:
        to_client, to_server = derive_keys(theirs, mine)[::-1]
        return to_client, to_server, incoming.read()
    to_server, to_client = derive_keys(mine, theirs)
    return to_server, to_client, incoming.read()


class Moved:
    """What one direction moved so far (plaintext bytes), read live by status."""

    __slots__ = ("moved",)

    def __init__(self) -> None:
        self.moved = 0


_libc = ctypes.CDLL(None, use_errno=True)
_UNSPEC = (ctypes.c_ubyte * 16)()  # a sockaddr whose family is AF_UNSPEC (0)


def reset_now(sock: socket.socket) -> None:
    """Abort ``sock``'s TCP connection at once: the other end gets a reset (never a FIN,
    which an app would take for a clean end of data), and a thread blocked in a recv or
    a send on it returns with an error. That is connect(2) with an AF_UNSPEC address,
    which Linux defines as dissolving the association (tcp_disconnect). The descriptor
    stays open for its owner to close."""
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return
    if fd < 0:
        return
    if _libc.connect(fd, _UNSPEC, ctypes.sizeof(_UNSPEC)) != 0:
        try:  # not a connected TCP socket any more; at least wake its threads
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _cut(*socks: socket.socket) -> None:
    for sock in socks:
        reset_now(sock)


def seal_loop(app: socket.socket, raw: socket.socket, key: bytes, moved: Moved,
              bucket=None, broken: threading.Event | None = None) -> None:
    """App -> peer: read what the app sent (up to FRAME_MAX at once), seal it in place,
    send it as one frame; at the app's end of data, send the FINAL frame and end the
    TCP stream's sending side."""
    cipher = Cipher(key, encrypt=True)
    buf = _Buffer(HEADER + FRAME_MAX + TAG)
    view = buf.view
    try:
        while True:
            size = FRAME_MAX if bucket is None else bucket.chunk()
            n = app.recv_into(view[HEADER:HEADER + size])
            if bucket is not None and n:
                bucket.take(n)
            if not n and broken is not None and broken.is_set():
                raise FrameError("the connection broke: no end frame")
            struct.pack_into(">I", buf.mem, 0, n if n else FINAL)
            cipher.run(buf, n)
            raw.sendall(view[:HEADER + n + TAG])
            if not n:
                raw.shutdown(socket.SHUT_WR)
                return
            moved.moved += n
    finally:
        del view
        buf.close()
        cipher.close()


class _Reader:
    """Exact reads from the TCP stream, first from the bytes the key exchange left."""

    def __init__(self, raw: socket.socket, prefix: bytes):
        self.raw, self.prefix = raw, memoryview(prefix)

    def fill(self, view: memoryview) -> int:
        """Fill ``view`` completely; returns how much arrived before the stream ended."""
        got = 0
        if self.prefix:
            got = min(len(self.prefix), len(view))
            view[:got] = self.prefix[:got]
            self.prefix = self.prefix[got:]
        while got < len(view):
            # The sender sends a frame whole: wait for all of it in one call (one wake-up
            # instead of one per segment that arrives).
            n = self.raw.recv_into(view[got:], 0, socket.MSG_WAITALL)
            if not n:
                break
            got += n
        return got


def open_loop(raw: socket.socket, app: socket.socket, key: bytes, prefix: bytes,
              moved: Moved, bucket=None) -> None:
    """Peer -> app: read a frame, open it in place, deliver the plaintext; at the FINAL
    frame end the app's side (FIN) once the TCP stream ends too. Raises FrameError on a
    truncation or any frame that does not authenticate; nothing unauthenticated is ever
    delivered."""
    cipher = Cipher(key, encrypt=False)
    buf = _Buffer(HEADER + FRAME_MAX + TAG)
    view = buf.view
    reader = _Reader(raw, prefix)
    try:
        while True:
            got = reader.fill(view[:HEADER])
            if got < HEADER:
                raise FrameError("the TLS hop ended without its end frame (truncation)")
            word = struct.unpack_from(">I", buf.mem, 0)[0]
            final, n = word & FINAL, word & ~FINAL
            if n > FRAME_MAX or (final and n):
                raise FrameError(f"malformed frame header {word:#010x}")
            if reader.fill(view[HEADER:HEADER + n + TAG]) < n + TAG:
                raise FrameError("the TLS hop ended inside a frame (truncation)")
            cipher.run(buf, n)
            if final:
                if reader.fill(view[:1]):
                    raise FrameError("data after the end frame")
                app.shutdown(socket.SHUT_WR)
                return
            if bucket is not None:
                bucket.take(n)
            app.sendall(view[HEADER:HEADER + n])
            moved.moved += n
    finally:
        del view
        buf.close()
        cipher.close()


def copy_loop(src: socket.socket, dst: socket.socket, moved: Moved, bucket=None,
              broken: threading.Event | None = None) -> None:
    """One direction of a plain connection: src -> dst through one buffer of up to
    FRAME_MAX, then pass the end on (FIN) unless the connection broke."""
    buf = _Buffer(FRAME_MAX)
    view = buf.view
    try:
        while True:
            size = FRAME_MAX if bucket is None else bucket.chunk()
            n = src.recv_into(view[:size])
            if not n:
                if broken is not None and broken.is_set():
                    raise ConnectionAbortedError("the connection broke: no end passed on")
                dst.shutdown(socket.SHUT_WR)
                return
            if bucket is not None:
                bucket.take(n)
            dst.sendall(view[:n])
            moved.moved += n
    finally:
        del view
        buf.close()


def both_directions(app: socket.socket, peer: socket.socket, forward, backward) -> None:
    """Run ``forward(broken)`` (app -> peer) here and ``backward(broken)`` (peer -> app) in
    a second thread, both on blocking sockets, until both ended in order. A failure in
    either sets ``broken`` (so the other passes no end on) and cuts both sockets (so it
    stops at once), and is raised here; the first error is the cause."""
    app.settimeout(None)
    peer.settimeout(None)
    errors: list[BaseException] = []
    broken = threading.Event()

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        broken.set()
        _cut(peer, app)  # the peer first: nothing may look like an orderly end there

    def run_backward() -> None:
        try:
            backward(broken)
        except BaseException as exc:  # noqa: BLE001 - handed to this thread
            fail(exc)

    thread = threading.Thread(target=run_backward, daemon=True,
                              name=threading.current_thread().name + "-back")
    thread.start()
    try:
        forward(broken)
    except BaseException as exc:  # noqa: BLE001 - raised below, after the join
        fail(exc)
    thread.join()
    if errors:
        raise errors[0]


def relay_frames(app: socket.socket, raw: socket.socket, seal_key: bytes, open_key: bytes,
                 prefix: bytes, up: Moved, down: Moved, bucket=None) -> None:
    """Both directions of one connection over sealed frames (this thread seals, a
    second opens); see :func:`both_directions`."""
    both_directions(
        app, raw,
        lambda broken: seal_loop(app, raw, seal_key, up, bucket, broken),
        lambda broken: open_loop(raw, app, open_key, prefix, down, bucket),
    )


def relay_plain(a: socket.socket, b: socket.socket, up: Moved, down: Moved,
                bucket=None) -> None:
    """Both directions of a plain connection, a thread each; see :func:`both_directions`."""
    both_directions(
        a, b,
        lambda broken: copy_loop(a, b, up, bucket, broken),
        lambda broken: copy_loop(b, a, down, bucket, broken),
    )
