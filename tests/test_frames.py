"""Sealed frames between two native relays (scistream_proxy.frames): the record layer
on its own (sealing, opening, key updates, every kind of tampering refused), and end to
end through two real relays with a man in the middle of their hop that alters,
replays or cuts the bytes: the producer app never receives a byte that was not sent,
and an attack is a failed connection with a reset, never a clean end."""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
import uuid

import pytest

from scistream_proxy import frames
from scistream_proxy.addresses import parse_address
from scistream_proxy.engines import reset_now
from scistream_proxy.ktls import ktls_available

from relaykit import KEY, Server, release_both, reserve_end


class _Frame:
    """A frame in a buffer like the relays' (header | payload | tag)."""

    def __init__(self, payload: bytes):
        self.buf = frames._Buffer(frames.HEADER + len(payload) + frames.TAG)
        struct.pack_into(">I", self.buf.mem, 0, len(payload))
        self.buf.view[frames.HEADER:frames.HEADER + len(payload)] = payload
        self.n = len(payload)

    def run(self, cipher) -> None:
        cipher.run(self.buf, self.n)

    @property
    def raw(self) -> bytes:
        return bytes(self.buf.view[:frames.HEADER + self.n + frames.TAG])

    def flip(self, offset: int) -> None:
        self.buf.view[offset] ^= 0x01

    def copy(self) -> _Frame:
        twin = _Frame(b"\0" * self.n)
        twin.buf.view[:] = self.buf.view
        return twin

    @property
    def payload(self) -> bytes:
        return bytes(self.buf.view[frames.HEADER:frames.HEADER + self.n])


def _sealed(key: bytes, payloads: list[bytes]) -> list[_Frame]:
    cipher = frames.Cipher(key, encrypt=True)
    out = []
    for payload in payloads:
        frame = _Frame(payload)
        frame.run(cipher)
        out.append(frame)
    return out


def test_frames_round_trip_across_key_updates(monkeypatch):
    monkeypatch.setattr(frames, "REKEY_FRAMES", 3)
    key = os.urandom(16)
    payloads = [os.urandom(n) for n in (1, 100, 16384, 5, 70000, 0, 9, 1 << 20)]
    sealed = _sealed(key, payloads)
    assert all(f.payload != p for f, p in zip(sealed, payloads, strict=True) if len(p) > 4)
    opener = frames.Cipher(key, encrypt=False)
    for frame, payload in zip(sealed, payloads, strict=True):
        frame.run(opener)
        assert frame.payload == payload
    # The key moved on after every third frame, on both sides in step.
    assert opener.key == frames.next_key(frames.next_key(key))


def test_a_frame_is_aes_128_gcm_with_the_sequence_number_as_nonce():
    """The wire format, against AES-GCM computed apart from the relay's code: the nonce
    is 4 zero bytes and the 64-bit sequence number, the header is the associated data,
    the tag follows the ciphertext."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = os.urandom(16)
    payloads = [os.urandom(n) for n in (3000, 0, 1 << 20)]
    for seq, frame in enumerate(_sealed(key, payloads)):
        header = frame.raw[:frames.HEADER]
        nonce = bytes(4) + seq.to_bytes(8, "big")
        assert frame.raw == header + AESGCM(key).encrypt(nonce, payloads[seq], header)


def test_equal_payloads_seal_differently_and_nothing_out_of_order_opens():
    key = os.urandom(16)
    first, second, third = _sealed(key, [b"same" * 100] * 3)
    assert first.raw != second.raw  # the nonce is the sequence number
    opener = frames.Cipher(key, encrypt=False)
    first.run(opener)
    with pytest.raises(frames.FrameError, match="authentication"):
        third.run(opener)  # second dropped (or third moved ahead)


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_an_altered_frame_is_refused(where):
    key = os.urandom(16)
    (frame,) = _sealed(key, [os.urandom(4096)])
    offset = {"header": 3, "payload": frames.HEADER + 2000, "tag": len(frame.raw) - 1}[where]
    frame.flip(offset)
    with pytest.raises(frames.FrameError, match="authentication"):
        frame.run(frames.Cipher(key, encrypt=False))


def test_a_replayed_frame_and_a_wrong_key_are_refused():
    key = os.urandom(16)
    (frame,) = _sealed(key, [b"x" * 1000])
    replay = frame.copy()
    opener = frames.Cipher(key, encrypt=False)
    frame.run(opener)
    with pytest.raises(frames.FrameError):
        replay.run(opener)
    with pytest.raises(frames.FrameError):
        _sealed(key, [b"y"])[0].run(frames.Cipher(os.urandom(16), encrypt=False))


def test_each_direction_has_its_own_key_and_both_randoms_count():
    a, b, c = os.urandom(32), os.urandom(32), os.urandom(32)
    to_server, to_client = frames.derive_keys(a, b)
    assert len(to_server) == len(to_client) == 16 and to_server != to_client
    assert frames.derive_keys(a, c)[0] != to_server
    assert frames.derive_keys(c, b)[0] != to_server
    assert frames.derive_keys(a, b) == (to_server, to_client)


class ManInTheMiddle(Server):
    """A TCP forwarder between the consumer relay and the producer relay. ``attack`` sees
    the consumer -> producer bytes with their offset and returns what to forward, or
    None to end the forwarding there with a clean FIN (a truncation)."""

    def __init__(self, target: str, attack):
        self.target, self.attack = parse_address(target), attack
        super().__init__(self._forward)

    def _forward(self, conn):
        with socket.create_connection(self.target) as up:
            back = threading.Thread(target=self._pipe, args=(up, conn, None), daemon=True)
            back.start()
            self._pipe(conn, up, self.attack)
            back.join()

    @staticmethod
    def _pipe(src, dst, attack):
        offset = 0
        try:
            while data := src.recv(65536):
                out = attack(offset, data) if attack else data
                offset += len(data)
                if out is None:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(out)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # a reset on one side is passed on as a reset
            reset_now(src)
            reset_now(dst)


def _open_through(producer, consumer, app_address, attack):
    """A TLS stream whose consumer relay reaches the producer relay only through a
    ManInTheMiddle with ``attack``."""
    uid = str(uuid.uuid4())
    prod = reserve_end(producer, "PROD", uid)
    cons = reserve_end(consumer, "CONS", uid)
    producer.call("hello", {"uid": uid, "key": KEY, "role": "PROD",
                            "app_listeners": [app_address]})
    mitm = ManInTheMiddle(prod["listeners"][0], attack)
    producer.call("connect", {"uid": uid, "remote_listeners": cons["listeners"],
                              "peer_fingerprint": cons["cert_fingerprint"],
                              "peer_certificate": cons["certificate"]})
    consumer.call("connect", {"uid": uid, "remote_listeners": [mitm.address],
                              "peer_fingerprint": prod["cert_fingerprint"],
                              "peer_certificate": prod["certificate"]})
    return uid, cons["listeners"][0], mitm


def _received_by(server_state: dict):
    def handler(conn):
        got = bytearray()
        try:
            while chunk := conn.recv(65536):
                got += chunk
            server_state["end"] = "clean"
        except ConnectionResetError:
            server_state["end"] = "reset"
        server_state["bytes"] = bytes(got)

    return handler


# Offsets beyond the TLS handshake and the frames hello (a few KiB): inside the frames.
ATTACK_AT = 256 << 10


def _flip(offset, data):
    if offset <= ATTACK_AT < offset + len(data):
        data = bytearray(data)
        data[ATTACK_AT - offset] ^= 0x40
    return bytes(data)


def _cut(offset, data):
    return None if offset + len(data) > ATTACK_AT else data


_replayed: list[bytes] = []


def _replay(offset, data):
    """Sends one early chunk of the frames a second time, later."""
    if offset < ATTACK_AT // 2 <= offset + len(data) and not _replayed:
        _replayed.append(data)
    if offset <= ATTACK_AT < offset + len(data) and _replayed:
        return data + _replayed.pop()
    return data


@pytest.mark.skipif(ktls_available() is None, reason="the kernel has TLS: no frames")
@pytest.mark.parametrize("attack,error", [(_flip, "authentication|malformed"), (_replay, ""),
                                          (_cut, "truncation")],
                         ids=["altered", "replayed", "truncated"])
def test_an_attack_on_the_hop_is_a_reset_and_delivers_nothing_forged(gateways, attack, error):
    _replayed.clear()
    producer, consumer = gateways
    state: dict = {}
    server = Server(_received_by(state))
    uid, listener, mitm = _open_through(producer, consumer, server.address, attack)
    payload = os.urandom(4 << 20)
    try:
        with socket.create_connection(parse_address(listener), timeout=30) as sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)
            except OSError:
                pass  # the reset may reach the consumer app while it still sends
        deadline = time.monotonic() + 30
        while "end" not in state and time.monotonic() < deadline:
            time.sleep(0.05)
        status = producer.call("status", {"uid": uid})
    finally:
        release_both(producer, consumer, uid)
        server.close()
        mitm.close()
    # The producer app got an exact prefix of what was sent (only authenticated frames),
    # short of the whole, and a reset instead of a clean end.
    assert state["end"] == "reset"
    assert len(state["bytes"]) < len(payload)
    assert state["bytes"] == payload[:len(state["bytes"])]
    conns = status["connections"]
    assert conns["frames"] == 1 and conns["failed"] == 1
    assert re.search(error, status["last_error"]), status["last_error"]
