"""Sealed frames between two native relays (scistream_proxy.frames): the key schedule and
the frames against known answers computed apart from the relay's code; the frames hello;
the receive state machine of both engines (pump and threads) fuzzed with arbitrary
segmentation, random headers and tampering; and end to end through two real relays with
a man in the middle of their hop that alters, replays, reorders, drops, cuts or extends
the frames, or strips or alters the ALPN: the producer app never receives a byte that was
not sent, and an attack is a failed connection with a reset, never a clean end."""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
import ssl
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from scistream_proxy import frames, streams
from scistream_proxy.addresses import parse_address
from scistream_proxy.engines import reset_now
from scistream_proxy.ktls import ktls_available
from scistream_proxy.limits import Counters, TokenBucket
from scistream_proxy.tls import generate_certificate, pinned_context

from badinputkit import HYPOTHESIS
from relaykit import KEY, Server, release_both, reserve_end

# Known answers, computed with OpenSSL's HKDF (not the relay's code), for
# client random = 00 01 .. 1f, server random = 20 21 .. 3f:
#   openssl kdf -keylen 32 -kdfopt digest:SHA256 -kdfopt hexkey:<client random><server random>
#     -kdfopt salt:scistream-frames/2 -kdfopt "info:scistream-frames/2 client to server" HKDF
#   (and "... server to client")
#   openssl kdf -keylen 16 -kdfopt digest:SHA256 -kdfopt mode:EXPAND_ONLY
#     -kdfopt hexkey:<secret> -kdfopt "info:scistream-frames/2 key" HKDF
#   (-keylen 12, "scistream-frames/2 iv"; -keylen 32, "scistream-frames/2 key update")
CLIENT_RANDOM, SERVER_RANDOM = bytes(range(32)), bytes(range(32, 64))
C2S_SECRET = "f5e07ad0f2bc4c9265e0fa5ef87424bd3f3a945f05ce2e3a08fbb3af02bce580"
S2C_SECRET = "4d5809abcaec55f16092dcacdca5b82438e63f8c0f0d86ff742f9a989865a076"
C2S_KEY, C2S_IV = "37365e0609ba96b582d78c2968439d7a", "150286fa05db15d4dd7a3586"
S2C_KEY, S2C_IV = "d5e8dd17c658c6a13394063ee8eddeb0", "46706579cd4d4e62624638b5"
C2S_NEXT_SECRET = "e8399ea0bae02514596828820ec2716410343069a2ef2bd75838e8d5217773ee"
C2S_NEXT_KEY, C2S_NEXT_IV = "903c0bc97bcddab7df2dbef4b856adc2", "e8beea68bf26e2fbf91f6dd3"


class _Frame:
    """A frame in a buffer like the relays' (header | payload | tag)."""

    def __init__(self, payload: bytes, word: int | None = None):
        self.buf = frames._Buffer(frames.HEADER + len(payload) + frames.TAG)
        struct.pack_into(">I", self.buf.mem, 0, len(payload) if word is None else word)
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


def _sealed(secret: bytes, payloads: list[bytes], final: bool = False) -> list[_Frame]:
    cipher = frames.Cipher(secret, encrypt=True)
    out = []
    for payload in payloads:
        frame = _Frame(payload)
        frame.run(cipher)
        out.append(frame)
    if final:
        frame = _Frame(b"", frames.FINAL)
        frame.run(cipher)
        out.append(frame)
    return out


# -- known answers --------------------------------------------------------------------

def test_the_key_schedule_gives_the_known_answers():
    c2s, s2c = frames.traffic_secrets(CLIENT_RANDOM, SERVER_RANDOM)
    assert (c2s.hex(), s2c.hex()) == (C2S_SECRET, S2C_SECRET)
    assert [x.hex() for x in frames.key_and_iv(c2s)] == [C2S_KEY, C2S_IV]
    assert [x.hex() for x in frames.key_and_iv(s2c)] == [S2C_KEY, S2C_IV]
    assert frames.next_secret(c2s).hex() == C2S_NEXT_SECRET
    assert [x.hex() for x in frames.key_and_iv(bytes.fromhex(C2S_NEXT_SECRET))] == \
        [C2S_NEXT_KEY, C2S_NEXT_IV]


def _nonce(iv_hex: str, seq: int) -> bytes:
    """RFC 8446 5.3, written out here: the sequence number, left-padded to 12 bytes,
    XORed with the IV."""
    iv = bytes.fromhex(iv_hex)
    padded = bytes(4) + seq.to_bytes(8, "big")
    return bytes(a ^ b for a, b in zip(iv, padded, strict=True))


def test_frames_are_aes_128_gcm_under_iv_xor_sequence_and_rekey_to_the_known_keys(
        monkeypatch):
    """The wire format, against AESGCM called here with the known keys and nonces: the
    header is the associated data, the tag follows the ciphertext; after REKEY_FRAMES
    frames the next secret's key and IV take over and the sequence restarts at 0."""
    monkeypatch.setattr(frames, "REKEY_FRAMES", 2)
    payloads = [b"first frame", b"", b"\x00" * 3000, b"fourth"]
    sealed = _sealed(bytes.fromhex(C2S_SECRET), payloads, final=True)
    expected_keys = [(C2S_KEY, C2S_IV, 0), (C2S_KEY, C2S_IV, 1),
                     (C2S_NEXT_KEY, C2S_NEXT_IV, 0), (C2S_NEXT_KEY, C2S_NEXT_IV, 1)]
    for frame, payload, (key, iv, seq) in zip(sealed, payloads, expected_keys, strict=False):
        header = len(payload).to_bytes(4, "big")
        assert frame.raw == header + AESGCM(bytes.fromhex(key)).encrypt(
            _nonce(iv, seq), payload, header)
    # The fifth frame (the end) is under the third key: the next secret's next secret.
    third = frames.next_secret(bytes.fromhex(C2S_NEXT_SECRET))
    key, iv = frames.key_and_iv(third)
    header = frames.FINAL.to_bytes(4, "big")
    assert sealed[4].raw == header + AESGCM(key).encrypt(_nonce(iv.hex(), 0), b"", header)


def test_frames_round_trip_across_key_updates(monkeypatch):
    monkeypatch.setattr(frames, "REKEY_FRAMES", 3)
    secret = os.urandom(32)
    payloads = [os.urandom(n) for n in (1, 100, 16384, 5, 70000, 0, 9, 1 << 20)]
    sealed = _sealed(secret, payloads)
    assert all(f.payload != p for f, p in zip(sealed, payloads, strict=True) if len(p) > 4)
    opener = frames.Cipher(secret, encrypt=False)
    for frame, payload in zip(sealed, payloads, strict=True):
        frame.run(opener)
        assert frame.payload == payload


def test_an_opener_that_does_not_update_its_key_in_step_is_refused(monkeypatch):
    monkeypatch.setattr(frames, "REKEY_FRAMES", 2)
    secret = os.urandom(32)
    sealed = _sealed(secret, [b"a", b"b", b"c"])
    monkeypatch.setattr(frames, "REKEY_FRAMES", 3)
    opener = frames.Cipher(secret, encrypt=False)
    sealed[0].run(opener)
    sealed[1].run(opener)
    with pytest.raises(frames.FrameError, match="authentication"):
        sealed[2].run(opener)


def test_equal_payloads_seal_differently_and_nothing_out_of_order_opens():
    secret = os.urandom(32)
    first, second, third = _sealed(secret, [b"same" * 100] * 3)
    assert first.raw != second.raw  # the nonce changes with the sequence number
    opener = frames.Cipher(secret, encrypt=False)
    first.run(opener)
    with pytest.raises(frames.FrameError, match="authentication"):
        third.run(opener)  # second dropped (or third moved ahead)


def test_two_connections_never_share_a_nonce():
    """With the per-key IV, the first frame of two connections has different nonces
    (without it, every connection's frame 0 used nonce 0)."""
    ivs = {frames.key_and_iv(frames.traffic_secrets(os.urandom(32), os.urandom(32))[0])[1]
           for _ in range(4)}
    assert len(ivs) == 4


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_an_altered_frame_is_refused(where):
    secret = os.urandom(32)
    (frame,) = _sealed(secret, [os.urandom(4096)])
    offset = {"header": 3, "payload": frames.HEADER + 2000, "tag": len(frame.raw) - 1}[where]
    frame.flip(offset)
    with pytest.raises(frames.FrameError, match="authentication"):
        frame.run(frames.Cipher(secret, encrypt=False))


def test_a_replayed_frame_and_a_wrong_secret_are_refused():
    secret = os.urandom(32)
    (frame,) = _sealed(secret, [b"x" * 1000])
    replay = frame.copy()
    opener = frames.Cipher(secret, encrypt=False)
    frame.run(opener)
    with pytest.raises(frames.FrameError, match="authentication"):
        replay.run(opener)
    with pytest.raises(frames.FrameError, match="authentication"):
        _sealed(secret, [b"y"])[0].run(frames.Cipher(os.urandom(32), encrypt=False))


def test_each_direction_has_its_own_secret_and_both_randoms_count():
    a, b, c = os.urandom(32), os.urandom(32), os.urandom(32)
    to_server, to_client = frames.traffic_secrets(a, b)
    assert len(to_server) == len(to_client) == 32 and to_server != to_client
    assert frames.traffic_secrets(a, c)[0] != to_server
    assert frames.traffic_secrets(c, b)[0] != to_server


# -- the frames hello, over a real pinned TLS 1.3 hop -----------------------------------

def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        two, _ = listener.accept()
    for sock in (one, two):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return one, two


@pytest.fixture(scope="module")
def pins(tmp_path_factory):
    """Two ends' certificates and keys, each pinning the other."""
    root = tmp_path_factory.mktemp("pins")
    for end in ("server", "client"):
        generate_certificate(end, root / f"{end}.key", root / f"{end}.pem",
                             datetime.timedelta(hours=1))

    def contexts(client_alpn=(frames.ALPN,)):
        server = pinned_context(server=True, cert_path=root / "server.pem",
                                key_path=root / "server.key",
                                peer_cert_path=root / "client.pem")
        client = pinned_context(server=False, cert_path=root / "client.pem",
                                key_path=root / "client.key",
                                peer_cert_path=root / "server.pem")
        server.set_alpn_protocols([frames.ALPN])  # as the relay's PROD end
        server.num_tickets = 0
        client.set_alpn_protocols(list(client_alpn))
        return server, client

    return contexts


def _tls_pair(contexts) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A handshaken TLS hop: (server end, client end)."""
    server_ctx, client_ctx = contexts
    one, two = _tcp_pair()
    box: dict = {}
    thread = threading.Thread(
        target=lambda: box.update(tls=server_ctx.wrap_socket(two, server_side=True)))
    thread.start()
    client = client_ctx.wrap_socket(one)
    thread.join()
    return box["tls"], client


def _exchange_on(server: ssl.SSLSocket) -> tuple[dict, threading.Thread]:
    """Run the relay's side of the hello on ``server`` in a thread; its result or error
    lands in the dict."""
    box: dict = {}

    def run():
        try:
            box["secrets"] = frames.exchange(server, 5)
        except (frames.FrameError, OSError) as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return box, thread


@HYPOTHESIS
@given(magic=st.sampled_from([frames.HELLO_MAGIC, b"SSF1", b"SSF3", b"\0\0\0\0"]),
       cuts=st.lists(st.integers(1, frames.HELLO_SIZE - 1), max_size=3, unique=True),
       extra=st.binary(max_size=24))
def test_the_hello_is_refused_unless_exactly_ours_in_any_split(pins, magic, cuts, extra):
    """The hello may arrive split over several TLS records; one of another version, or
    followed by bytes inside its TLS record (bytes the SSL object would take with it
    when the frames start), is refused."""
    server, client = _tls_pair(pins())
    try:
        client_random = os.urandom(32)
        hello = magic + client_random
        bounds = [0, *sorted(cuts), len(hello)]
        records = [hello[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        records[-1] += extra
        box, thread = _exchange_on(server)
        for record in records:
            client.sendall(record)
        thread.join(10)
        theirs = client.recv(frames.HELLO_SIZE)
    finally:
        client.close()
        server.close()
    if magic == frames.HELLO_MAGIC and not extra:
        assert theirs.startswith(frames.HELLO_MAGIC)
        to_server, to_client = frames.traffic_secrets(client_random, theirs[4:])
        assert box["secrets"] == (to_client, to_server)  # it seals what goes to the client
    else:
        assert "secrets" not in box
        assert re.search("not scistream-frames/2|after the frames hello", str(box["error"]))


def test_a_peer_offering_only_an_unknown_version_speaks_no_frames(pins):
    server, client = _tls_pair(pins(client_alpn=("scistream-frames/3",)))
    try:
        assert server.selected_alpn_protocol() is None
        assert client.selected_alpn_protocol() is None
    finally:
        client.close()
        server.close()


# -- the receive state machine of both engines, fuzzed ------------------------------------

def _received(secret: bytes, wire: bytes, cuts: list[int], engine: str) -> tuple[bytes, str]:
    """Hand a relay engine a frames hop whose peer sends ``wire`` in pieces (split at
    ``cuts``) and then ends its TCP stream; returns what the app received and how its
    connection ended ("clean": a FIN; "reset")."""
    raw_peer, raw = _tcp_pair()
    app, app_peer = _tcp_pair()
    app_peer.shutdown(socket.SHUT_WR)  # the app sends nothing: that direction ends at once
    # The engine streams.Stream would choose: a throttled connection runs threads.
    bucket = TokenBucket(10**9) if engine == "threads" else None
    outcome: dict = {}

    def move():
        try:
            outcome["orderly"] = streams._move(
                app, streams.FramesPeer(raw, os.urandom(32), secret), bucket, Counters())
        except OSError as exc:
            outcome["error"] = exc

    mover = threading.Thread(target=move)
    mover.start()
    got, end = bytearray(), "clean"
    try:
        bounds = [0, *sorted(set(cuts)), len(wire)]
        try:
            for a, b in zip(bounds, bounds[1:], strict=False):
                raw_peer.sendall(wire[a:b])
                time.sleep(0.001)  # the pieces arrive apart
            raw_peer.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the engine cut the hop already (what it read was refused)
        app_peer.settimeout(10)
        try:
            while chunk := app_peer.recv(1 << 16):
                got += chunk
        except ConnectionResetError:
            end = "reset"
        mover.join(10)
    finally:
        for sock in (raw_peer, raw, app, app_peer):
            sock.close()
    assert not mover.is_alive()
    assert ("orderly" in outcome) == (end == "clean"), outcome
    return bytes(got), end


_payload_sizes = st.one_of(st.integers(0, 3000), st.integers(130_000, 300_000))


@pytest.mark.parametrize("engine", ["pump", "threads"])
@HYPOTHESIS
@given(sizes=st.lists(_payload_sizes, max_size=5), final=st.booleans(),
       trailer=st.one_of(st.just(b""), st.binary(min_size=1, max_size=40)),
       tamper=st.one_of(
           st.just(None),
           st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
           st.tuples(st.just("header"), st.integers(0, 5), st.binary(min_size=4, max_size=4))),
       cuts=st.lists(st.floats(0, 1), max_size=6), seed=st.integers(0, 2**32))
def test_the_receive_state_machine_delivers_only_authentic_frames(
        engine, sizes, final, trailer, tamper, cuts, seed):
    """Whatever arrives, however split: the app receives the payloads of the authentic
    frames before the first bad byte and nothing else, and a clean end only after a
    FINAL frame followed by nothing but the end of the TCP stream; else a reset."""
    rng = random.Random(seed)
    secret = rng.randbytes(32)
    payloads = [rng.randbytes(n) for n in sizes]
    sealed = _sealed(secret, payloads, final)
    wire = bytearray(b"".join(f.raw for f in sealed))
    starts = [0]
    for frame in sealed:
        starts.append(starts[-1] + len(frame.raw))
    good = len(sealed)  # frames before the first altered one
    if tamper is not None and tamper[0] == "flip" and wire:
        offset = int(tamper[1] * len(wire))
        wire[offset] ^= tamper[2]
        good = max(i for i, start in enumerate(starts) if start <= offset)
    elif tamper is not None and tamper[0] == "header" and tamper[1] < len(sealed):
        start = starts[tamper[1]]
        if wire[start:start + 4] != tamper[2]:
            wire[start:start + 4] = tamper[2]
            good = tamper[1]
    wire += trailer
    got, end = _received(secret, bytes(wire), [int(c * len(wire)) for c in cuts], engine)
    authentic = b"".join(payloads[:min(good, len(payloads))])
    clean = good == len(sealed) and final and not trailer
    assert end == ("clean" if clean else "reset")
    # A reset discards what the app's socket had not sent yet: after one, a prefix.
    assert got == authentic if clean else authentic.startswith(got)


@pytest.mark.parametrize("engine", ["pump", "threads"])
def test_bytes_after_the_end_frame_are_refused_on_both_engines(engine):
    secret = os.urandom(32)
    wire = b"".join(f.raw for f in _sealed(secret, [b"data"], final=True))
    assert _received(secret, wire, [], engine) == (b"data", "clean")
    assert _received(secret, wire + b"\0", [], engine) == (b"data", "reset")
    assert _received(secret, wire + wire, [len(wire)], engine) == (b"data", "reset")


# -- end to end, with a man in the middle of the relays' hop ------------------------------

def _unit_size(buf: bytearray, in_frames: bool) -> int | None:
    """The size of the unit at the start of ``buf`` (a TLS record, or once the frames
    began a frame), or None until its header is there."""
    if in_frames:
        if len(buf) < frames.HEADER:
            return None
        word = int.from_bytes(buf[:frames.HEADER], "big")
        return frames.HEADER + (word & ~frames.FINAL) + frames.TAG
    return 5 + int.from_bytes(buf[3:5], "big") if len(buf) >= 5 else None


class FrameMan(Server):
    """A TCP forwarder between the consumer relay (the TLS client) and the producer relay
    that sees the consumer -> producer bytes as whole units: TLS records until the frames
    begin (a frame's header starts with 0x00 or 0x80, a TLS record with 20..23), then
    frames. ``attack(kind, index, unit)`` ("record" or "frame", counted per kind) returns
    the bytes to forward in the unit's place, or None to end the forwarding there with a
    clean FIN (a truncation)."""

    def __init__(self, target: str, attack):
        self.target, self.attack = parse_address(target), attack
        super().__init__(self._forward)

    def _forward(self, conn):
        with socket.create_connection(self.target) as up:
            back = threading.Thread(target=self._pipe, args=(up, conn), daemon=True)
            back.start()
            try:
                self._units(conn, up)
            except OSError:  # a reset on one side is passed on as a reset
                reset_now(conn)
                reset_now(up)
            back.join()

    def _units(self, src, dst):
        buf, counts, in_frames = bytearray(), {"record": 0, "frame": 0}, False
        while True:
            if buf and not in_frames and buf[0] not in (20, 21, 22, 23):
                in_frames = True
            size = _unit_size(buf, in_frames)
            if size is not None and len(buf) >= size:
                kind = "frame" if in_frames else "record"
                unit = bytes(buf[:size])
                del buf[:size]
                out = self.attack(kind, counts[kind], unit)
                counts[kind] += 1
                if out is None:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(out)
                continue
            data = src.recv(1 << 20)
            if not data:
                dst.sendall(buf)
                dst.shutdown(socket.SHUT_WR)
                return
            buf += data

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            reset_now(src)
            reset_now(dst)


def _open_through(producer, consumer, app_address, attack, rate=0):
    """A TLS stream whose consumer relay reaches the producer relay only through a
    FrameMan with ``attack``."""
    uid = str(uuid.uuid4())
    prod = reserve_end(producer, "PROD", uid, rate=rate)
    cons = reserve_end(consumer, "CONS", uid, rate=rate)
    producer.call("hello", {"uid": uid, "key": KEY, "role": "PROD",
                            "app_listeners": [app_address]})
    mitm = FrameMan(prod["listeners"][0], attack)
    producer.call("connect", {"uid": uid, "remote_listeners": cons["listeners"],
                              "peer_fingerprint": cons["cert_fingerprint"],
                              "peer_certificate": cons["certificate"]})
    consumer.call("connect", {"uid": uid, "remote_listeners": [mitm.address],
                              "peer_fingerprint": prod["cert_fingerprint"],
                              "peer_certificate": prod["certificate"]})
    return uid, cons["listeners"][0], mitm


def _received_by(server_state: dict):
    def handler(conn):
        server_state["connected"] = True
        got = bytearray()
        try:
            while chunk := conn.recv(65536):
                got += chunk
            server_state["end"] = "clean"
        except ConnectionResetError:
            server_state["end"] = "reset"
        server_state["bytes"] = bytes(got)

    return handler


def _send(listener: str, payload: bytes) -> None:
    """The consumer app: send ``payload``, end, and wait for the stream to end."""
    with socket.create_connection(parse_address(listener), timeout=30) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
        except OSError:
            pass  # the reset may reach the consumer app while it still sends


def _wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


# The attacked frame: a 4 MiB payload makes at least four data frames (1 MiB at most
# each) and the end frame.
AT = 2


def _altered(kind, index, unit):
    if kind == "frame" and index == AT:
        return unit[:-1] + bytes([unit[-1] ^ 0x40])
    return unit


def _replayed(kind, index, unit):
    return unit + unit if kind == "frame" and index == AT else unit


_held: list[bytes] = []


def _reordered(kind, index, unit):
    if kind == "frame" and index == AT:
        _held.append(unit)
        return b""
    if kind == "frame" and index == AT + 1:
        return unit + _held.pop()
    return unit


def _dropped(kind, index, unit):
    return b"" if kind == "frame" and index == AT else unit


def _cut_between(kind, index, unit):
    return None if kind == "frame" and index == AT else unit


def _cut_inside(kind, index, unit):
    if kind == "frame" and index == AT:
        return unit[:len(unit) // 2]
    return None if kind == "frame" and index == AT + 1 else unit


def _after_end(kind, index, unit):
    return unit + b"\0" * 20 if kind == "frame" and unit[0] & 0x80 else unit


ATTACKS = {
    "altered": (_altered, "authentication"),
    "replayed": (_replayed, "authentication"),
    "reordered": (_reordered, "authentication"),
    "dropped": (_dropped, "authentication"),
    "cut-between-frames": (_cut_between, "ended without its end frame"),
    "cut-inside-a-frame": (_cut_inside, "ended inside a frame"),
    "data-after-the-end": (_after_end, "data after the end frame"),
}
# A throttled stream's connections run the thread engine, the others a pump.
ENGINES = {"pump": 0, "threads": 10_000_000}


@pytest.mark.skipif(ktls_available() is None, reason="the kernel has TLS: no frames")
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_attack_on_the_frames_is_a_reset_and_delivers_nothing_forged(gateways, name,
                                                                      engine):
    attack, error = ATTACKS[name]
    _held.clear()
    producer, consumer = gateways
    state: dict = {}
    server = Server(_received_by(state))
    uid, listener, mitm = _open_through(producer, consumer, server.address, attack,
                                        rate=ENGINES[engine])
    payload = os.urandom(4 << 20)
    try:
        _send(listener, payload)
        _wait_for(lambda: "end" in state)
        # The relay counts the failure after it cut the sockets (the app may see the
        # reset first).
        _wait_for(lambda: producer.call("status", {"uid": uid})["connections"]["failed"])
        status = producer.call("status", {"uid": uid})
    finally:
        release_both(producer, consumer, uid)
        server.close()
        mitm.close()
    # The producer app got an exact prefix of what was sent (only authenticated frames)
    # and a reset instead of a clean end.
    assert state["end"] == "reset"
    assert state["bytes"] == payload[:len(state["bytes"])]
    if name != "data-after-the-end":
        assert len(state["bytes"]) < len(payload)
    conns = status["connections"]
    assert conns["frames"] == 1 and conns["failed"] == 1
    assert conns["pumped"] == (engine == "pump")  # the engine under test moved it
    assert re.search(error, status["last_error"]), status["last_error"]


def _alpn_altered(kind, index, unit):
    if kind == "record" and index == 0:  # the ClientHello
        assert frames.ALPN.encode() in unit
        return unit.replace(frames.ALPN.encode(), b"scistream-frames/3")
    return unit


def _alpn_stripped(kind, index, unit):
    """The ALPN extension (type 16) renamed to a type servers ignore (a GREASE value,
    RFC 8701): the server sees no ALPN, and no length changes."""
    if kind == "record" and index == 0:
        at = unit.index(frames.ALPN.encode()) - 7  # type, length, list length, name length
        assert unit[at:at + 2] == b"\x00\x10"
        return unit[:at] + b"\xfa\xfa" + unit[at + 2:]
    return unit


@pytest.mark.skipif(ktls_available() is None, reason="the kernel has TLS: no frames")
@pytest.mark.parametrize("attack", [_alpn_altered, _alpn_stripped], ids=["altered", "stripped"])
def test_an_alpn_changed_in_flight_fails_the_handshake(gateways, attack):
    """The ClientHello is in TLS 1.3's transcript: an ALPN altered or stripped on the way
    (to force TLS records, or another version) fails the handshake; nothing reaches the
    producer app."""
    producer, consumer = gateways
    state: dict = {}
    server = Server(_received_by(state))
    uid, listener, mitm = _open_through(producer, consumer, server.address, attack)
    try:
        _send(listener, b"x" * 1000)
        _wait_for(lambda: producer.call("status", {"uid": uid})["connections"]
                  ["handshakes_refused"])
        status = producer.call("status", {"uid": uid})
    finally:
        release_both(producer, consumer, uid)
        server.close()
        mitm.close()
    assert "connected" not in state
    conns = status["connections"]
    # A handshake refused on the WAN side is not a connection of the stream (nor a
    # failed one): anyone may start one (docs/native.md, "Under a flood").
    assert conns["handshakes_refused"] == 1 and conns["failed"] == 0 and conns["frames"] == 0
    assert "SSL" in status["last_error"], status["last_error"]


@pytest.mark.skipif(ktls_available() is None, reason="the kernel has TLS: no frames")
@pytest.mark.parametrize("stopped", ["producer", "consumer"])
def test_a_stream_stopped_while_its_end_frame_is_in_flight_ends_in_a_reset(gateways,
                                                                           stopped):
    """The man in the middle holds the consumer's end frame until one end of the stream
    was released. Released at the producer (the receiving end): the producer app sees a
    reset, never a clean end. Released at the consumer (after its app's end was sealed
    and sent): that end frame is authentic and arrives, so the producer app gets every
    byte and a clean end, as a TLS close_notify sent before a cut would give it. Nothing
    is left behind either way (the fixture checks)."""
    producer, consumer = gateways
    holding, go = threading.Event(), threading.Event()

    def hold_the_end(kind, index, unit):
        if kind == "frame" and unit[0] & 0x80:
            holding.set()
            go.wait(30)
        return unit

    state: dict = {}
    server = Server(_received_by(state))
    uid, listener, mitm = _open_through(producer, consumer, server.address, hold_the_end)
    payload = os.urandom(1 << 20)
    app = threading.Thread(target=_send, args=(listener, payload), daemon=True)
    try:
        app.start()
        assert holding.wait(30)
        gateway = producer if stopped == "producer" else consumer
        assert gateway.call("release", {"uid": uid})["released"] is True
        go.set()
        _wait_for(lambda: "end" in state)
        app.join(30)
    finally:
        go.set()
        release_both(producer, consumer, uid)
        server.close()
        mitm.close()
    if stopped == "producer":
        assert state["end"] == "reset"
        assert state["bytes"] == payload[:len(state["bytes"])]
    else:
        assert (state["end"], state["bytes"]) == ("clean", payload)
    assert not app.is_alive()


def _echo(conn):
    buf = bytearray(1 << 16)
    while n := conn.recv_into(buf):
        conn.sendall(memoryview(buf)[:n])


def _open(producer, consumer, app_address):
    """A TLS stream between the two gateways' relays: (uid, PROD reserve, CONS reserve)."""
    uid = str(uuid.uuid4())
    prod = reserve_end(producer, "PROD", uid)
    cons = reserve_end(consumer, "CONS", uid)
    producer.call("hello", {"uid": uid, "key": KEY, "role": "PROD",
                            "app_listeners": [app_address]})
    producer.call("connect", {"uid": uid, "remote_listeners": cons["listeners"],
                              "peer_fingerprint": cons["cert_fingerprint"],
                              "peer_certificate": cons["certificate"]})
    consumer.call("connect", {"uid": uid, "remote_listeners": prod["listeners"],
                              "peer_fingerprint": prod["cert_fingerprint"],
                              "peer_certificate": prod["certificate"]})
    return uid, prod, cons


@pytest.mark.skipif(ktls_available() is None, reason="the kernel has TLS: no frames")
def test_a_relay_serves_a_peer_of_an_unknown_frames_version_tls_records(gateways):
    """A pinned client offering only scistream-frames/3 (as a newer relay might) is
    served as a peer without frames: no ALPN, TLS records, the bytes intact."""
    producer, consumer = gateways
    server = Server(_echo)
    uid, prod, _ = _open(producer, consumer, server.address)
    cons_dir = Path(consumer.settings_path).parent / "streams" / uid
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cons_dir / "cert.pem", cons_dir / "key.pem")
    ctx.set_alpn_protocols(["scistream-frames/3"])
    try:
        with socket.create_connection(parse_address(prod["listeners"][0]), timeout=30) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"ping")
                assert tls.recv(4) == b"ping"
                alpn = tls.selected_alpn_protocol()
        status = producer.call("status", {"uid": uid})["connections"]
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert alpn is None
    assert status["frames"] == 0 and status["total"] == 1


@pytest.mark.slow
@pytest.mark.skipif(ktls_available() is None, reason="the kernel has TLS: no frames")
def test_a_transfer_past_two_to_the_sixteen_frames_updates_keys_in_step(gateways):
    """A ping-pong of small messages makes one frame per message in each direction, so
    66,000 round trips take both directions' keys past their first update (after 65,536
    frames); every message comes back intact."""
    producer, consumer = gateways
    server = Server(_echo)
    uid, prod, cons = _open(producer, consumer, server.address)
    rounds = frames.REKEY_FRAMES + 500
    try:
        with socket.create_connection(parse_address(cons["listeners"][0]), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(rounds):
                message = i.to_bytes(8, "big")
                sock.sendall(message)
                back = b""
                while len(back) < 8:
                    chunk = sock.recv(8 - len(back))
                    assert chunk, f"the stream ended at message {i}"
                    back += chunk
                assert back == message
        status = producer.call("status", {"uid": uid})["connections"]
    finally:
        release_both(producer, consumer, uid)
        server.close()
    assert status["frames"] == 1 and status["failed"] == 0
