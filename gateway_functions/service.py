"""The S2CS logic behind every gateway function: one :class:`Gateway` per call.

Each method takes the request dict of the wire contract, returns the reply dict, and
raises a :class:`~scistream_gateway.errors.SciStreamError` for an expected failure.
State changes happen inside one SQLite write transaction, and every call first reaps
streams whose lease ran out, so a client that vanished leaks nothing. The request is
checked before that: a malformed request is refused having changed nothing at all.
Admission control (``NO_RESOURCE``): ``num_conn`` up to the gateway's
``max_num_conn``, the sum of active rates up to ``rate_capacity``, and ports the
kernel lets this gateway bind in its range.
``reserve`` and ``connect`` mark a stream ``busy`` with their worker while they start
or change its proxy; :mod:`scistream_gateway.recovery` undoes the work of a dead one.
Ownership: ``reserve`` records the SHA-256 of the stream's control secret, and every
later call on the stream (but ``hello``, which proves the hello key) proves the secret
before anything else happens, else ``AUTH_ERROR`` with nothing changed.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from scistream_gateway import __version__
from scistream_gateway.errors import (
    AuthError,
    BadFormat,
    ConnError,
    InvalidUid,
    NoResource,
    NotImplementedHere,
    Unavailable,
)
from scistream_gateway.protocol import (
    MAX_LISTED,
    ConnectReply,
    ConnectRequest,
    GatewayInfoReply,
    GatewayInfoRequest,
    HelloReply,
    HelloRequest,
    ListStreamsReply,
    ListStreamsRequest,
    ReleaseReply,
    RenewReply,
    RenewRequest,
    ReserveReply,
    ReserveRequest,
    State,
    StatusReply,
    StreamRequest,
    StreamSummary,
    WaitHelloReply,
    WaitHelloRequest,
    addresses,
    format_address,
    is_canonical_uid,
)
from scistream_gateway.recovery import Recovery, busy_alive
from scistream_gateway.settings import GatewaySettings
from scistream_gateway.store import Store, StreamRow
from scistream_proxy.backends import (
    BACKENDS,
    ProxyError,
    ProxySpec,
    ProxyUnavailable,
)
from scistream_proxy.process import ProcessIdentity, survival_report
from scistream_proxy.tls import fingerprint_of_pem, generate_certificate

__all__ = ["Gateway"]

CERT_FILE, KEY_FILE, PEER_CERT_FILE = "cert.pem", "key.pem", "peer.pem"
RELEASE_WAIT_S = 30.0  # release waits this long for a reserve/connect of its uid to end

# Test fault points: with SCISTREAM_TEST_FAULTS=1 in a worker's environment, a file
# <state_dir>/test-faults/<step> makes the worker that reaches <step> remove the file
# and SIGKILL itself there, so tests kill a real worker at an exact point.
FAULTS_ENV = "SCISTREAM_TEST_FAULTS"
FAULT_STEPS = ("reserve:recorded", "reserve:proxy-started", "connect:marked",
               "connect:proxy-connected")


def _this_worker() -> dict:
    """This worker process as recorded in ``busy``: pid and kernel start time."""
    identity = ProcessIdentity.of(os.getpid())
    return {"pid": identity.pid, "start_time": identity.start_time}


NOBODY = {"pid": 0, "start_time": 0, "op": "undo"}  # a busy mark no process matches


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _checked_hello(stream: StreamRow, role: str, key: str, app_listeners: object,
                   given: bool) -> list[str] | None:
    """The checks of a hello on ``stream`` (``hello``'s own, or folded into the
    producer's ``connect``): the stream takes hellos, ``key`` is its hello key, ``role``
    its role; a producer's ``app_listeners`` (``given`` or not) are well formed and, once
    recorded, the same. Returns them (None for a consumer); changes nothing."""
    uid = stream.uid
    # A FAILED stream keeps its row until released, but takes no hello (as no
    # connect): its proxy is gone.
    if not stream.active or stream.state == State.FAILED or stream.key_sha256 is None:
        raise InvalidUid(f"stream {uid} is {stream.state}")
    if not hmac.compare_digest(_sha256(key), stream.key_sha256):
        raise AuthError(f"wrong hello key for stream {uid}")
    if role != stream.role:
        raise BadFormat(f"stream {uid} is {stream.role} on this gateway, hello says {role}")
    if role != "PROD":
        if given:
            raise BadFormat("a CONS hello takes no app_listeners")
        return None
    if not given:
        raise BadFormat("a PROD hello must give app_listeners")
    app_listeners = addresses(app_listeners, "app_listeners", stream.num_conn)
    if stream.state != State.RESERVED and stream.app_listeners != app_listeners:
        raise BadFormat(f"stream {uid} already has app_listeners {stream.app_listeners} "
                        f"({stream.state})")
    return app_listeners


def _prove(stream: StreamRow, control: str | None) -> None:
    """``AUTH_ERROR`` unless ``control`` is the control secret of ``stream`` (None: the
    request gave none)."""
    if control is None or stream.control_sha256 is None or not hmac.compare_digest(
            _sha256(control), stream.control_sha256):
        raise AuthError(f"the control secret of stream {stream.uid} was not proven: only "
                        "the client that reserved it controls it")


class Gateway(Recovery):
    """One gateway's state and proxies, opened for the length of one function call."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        settings.make_state_dir()
        self.streams_dir = settings.state_dir / "streams"
        self.streams_dir.mkdir(mode=0o700, exist_ok=True)
        database = settings.state_dir / "state.sqlite3"
        if not database.exists():  # created 0600, whatever the umask
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
        self.store = Store(database)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    # -- helpers ----------------------------------------------------------------
    def stream_dir(self, uid: str) -> Path:
        return self.streams_dir / uid

    def _lookup(self, uid: str) -> StreamRow:
        stream = self.store.get(uid)
        if stream is None:
            raise InvalidUid(f"no stream {uid} on gateway {self.settings.name}")
        return stream

    def _proven(self, uid: str, control: str | None) -> StreamRow:
        """Stream ``uid``, once ``control`` is proven to be its control secret;
        ``INVALID_UID`` if there is no such stream, ``AUTH_ERROR`` if not proven (a row
        from before control secrets has none: only the operator can release it)."""
        stream = self._lookup(uid)
        _prove(stream, control)
        return stream

    def _cleanup(self, stream: StreamRow, state: State, detail: str = "") -> None:
        """Stop the proxy, delete key material, free ports; inside a transaction."""
        if stream.proxy is not None:
            self.backend(stream.backend).stop(stream.proxy, self.stream_dir(stream.uid))
        shutil.rmtree(self.stream_dir(stream.uid), ignore_errors=True)
        self.store.free_ports(stream.uid)
        self.store.update(stream.uid, state=state, proxy=None, key_sha256=None, busy=None,
                          detail=detail or stream.detail)

    def _fault_point(self, step: str) -> None:
        """A test's fault injection (see FAULTS_ENV): die here if asked to."""
        if os.environ.get(FAULTS_ENV) != "1":
            return
        try:
            (self.settings.state_dir / "test-faults" / step).unlink()
        except OSError:
            return  # not asked, or another worker took this one
        os.kill(os.getpid(), signal.SIGKILL)


    def _bind_listeners(self, host: str, count: int, reuseport: bool = False
                        ) -> list[socket.socket]:
        """Bind ``count`` ports of the range on ``host``. The kernel decides: a port
        another process (or another user's gateway state) holds fails to bind.

        ``reuseport``: for backends whose proxy binds the port itself (containers): only
        a socket of this same uid can join the port then (see scistream_proxy.holder)."""
        used = self.store.used_ports()
        try:
            family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
        except OSError as exc:
            raise Unavailable(f"gateway address {host!r} does not resolve: {exc}") from None
        bound: list[socket.socket] = []
        for port in range(self.settings.port_min, self.settings.port_max + 1):
            if port in used:
                continue
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((host, port))
                sock.listen(512)
            except OSError:
                sock.close()
                continue
            bound.append(sock)
            if len(bound) == count:
                return bound
        for sock in bound:
            sock.close()
        raise NoResource(
            f"port range {self.settings.port_min}-{self.settings.port_max} on {host} exhausted:"
            f" {len(bound)} free, num_conn={count} needed"
        )

    @staticmethod
    def _reserve_reply(stream: StreamRow) -> dict:
        return ReserveReply(
            uid=stream.uid, role=stream.role, listeners=stream.listeners,
            cert_fingerprint=stream.cert_fingerprint, certificate=stream.certificate,
            lease_expires=stream.lease_expires,
        ).wire()

    # -- gateway functions --------------------------------------------------------
    def gateway_info(self, raw: object) -> dict:
        GatewayInfoRequest.parse(raw)
        self.reap()
        s = self.settings
        active = self.store.active_streams()
        size = s.port_max - s.port_min + 1
        survival = survival_report()
        return GatewayInfoReply(
            name=s.name, version=__version__, backend=s.backend,
            backends={name: {"available": reason is None, "reason": reason}
                      for name in BACKENDS
                      for reason in [self.backend(name).unavailable_reason()]},
            lan_address=s.lan_address, wan_address=s.wan_address,
            wan_advertise_address=s.wan_advertise_address,
            port_range=[s.port_min, s.port_max],
            free_ports=size - len(self.store.used_ports()),
            max_num_conn=s.max_num_conn, rate_capacity=s.rate_capacity,
            rate_in_use=sum(st.rate for st in active), active_streams=len(active),
            proxy_launch=survival,
            warnings=[survival["warning"]] if survival["warning"] else [],
        ).wire()

    def reserve(self, raw: object) -> dict:
        req = ReserveRequest.parse(raw, self.settings)
        uid, role, num_conn, rate, key_sha256 = (req.uid, req.role, req.num_conn, req.rate,
                                                 req.key_sha256)
        lease_s = req.lease_s or self.settings.default_lease_s
        self.reap()
        s = self.settings
        if num_conn > s.max_num_conn:
            raise NoResource(f"num_conn={num_conn} exceeds the {s.max_num_conn} connections "
                             f"per stream gateway {s.name} allows (max_num_conn)")
        backend = self.backend(s.backend)
        reason = backend.unavailable_reason()
        if reason:
            raise Unavailable(f"backend {s.backend} is not usable on {s.name}: {reason}")
        if rate and not backend.supports_rate:
            raise NotImplementedHere(f"backend {s.backend} of {s.name} cannot enforce a rate "
                                     "limit; ask for rate 0 (unlimited) or use a gateway whose "
                                     "backend enforces rates")

        with self.store.transaction():
            existing = self.store.get(uid)
            if existing is not None:
                # Only the client that reserved the uid may repeat its reserve (and see
                # the reply): another caller learns nothing about the stream.
                if existing.control_sha256 is None or not hmac.compare_digest(
                        req.control_sha256, existing.control_sha256):
                    raise AuthError(f"uid {uid} is reserved on {s.name} by another client")
                same = ((existing.role, existing.num_conn, existing.rate, existing.key_sha256,
                         existing.owner_sha256)
                        == (role, num_conn, rate, key_sha256, req.owner_sha256))
                if existing.state == State.STARTING:  # its worker lives: reap_abandoned ran
                    raise Unavailable(f"a reserve of stream {uid} is in progress on {s.name};"
                                      " try again")
                if not existing.active:
                    raise BadFormat(f"uid {uid} was already used on {s.name} "
                                    f"({existing.state}); a new stream needs a new uid")
                if same:
                    return self._reserve_reply(existing)
                raise BadFormat(f"uid {uid} is already reserved on {s.name} "
                                f"({existing.state}) with other parameters")
            if s.rate_capacity and rate == 0:
                raise NoResource(f"gateway {s.name} has a rate capacity of {s.rate_capacity}"
                                 " kbit/s; ask for a rate (0 = unlimited is not available)")
            in_use = sum(st.rate for st in self.store.active_streams())
            if s.rate_capacity and in_use + rate > s.rate_capacity:
                raise NoResource(f"rate capacity of {s.name} exhausted: {in_use} of "
                                 f"{s.rate_capacity} kbit/s in use, {rate} asked")

            host = s.wan_address if role == "PROD" else s.lan_address
            # Peers dial the address the NAT exposes (if any), with the same ports.
            advertised = s.wan_advertise_address if role == "PROD" else s.lan_address
            sockets = self._bind_listeners(host, num_conn, backend.reuseport)
            ports = [sock.getsockname()[1] for sock in sockets]
            # Recorded before anything starts: if this worker dies from here on, the
            # next call finds the row busy with a dead worker and undoes the rest.
            self.store.insert(StreamRow(
                uid=uid, role=role, state=State.STARTING, num_conn=num_conn, rate=rate,
                key_sha256=key_sha256, lease_expires=time.time() + lease_s,
                listeners=[format_address(advertised, port) for port in ports],
                app_listeners=[], remote_listeners=[], tls=True, cert_fingerprint="",
                certificate="", backend=backend.name, proxy=None, ports=ports,
                busy={**_this_worker(), "op": "reserve"},
                control_sha256=req.control_sha256, owner_sha256=req.owner_sha256,
            ))
        directory = self.stream_dir(uid)
        handle = None
        try:
            self._fault_point("reserve:recorded")
            shutil.rmtree(directory, ignore_errors=True)  # leftovers of a crashed call
            directory.mkdir(mode=0o700)
            certificate, fingerprint = generate_certificate(
                f"scistream {role} {uid}", directory / KEY_FILE, directory / CERT_FILE,
                datetime.timedelta(seconds=s.max_lease_s + 86400),
            )
            handle = backend.start(ProxySpec(
                uid=uid, role=role, stream_dir=directory, sockets=sockets, rate=rate,
                cert_file=CERT_FILE, key_file=KEY_FILE, gateway=s.name,
            ))
            for sock in sockets:  # the proxy holds its own copies now
                sock.close()
            self._fault_point("reserve:proxy-started")
            with self.store.transaction():
                self.store.update(uid, state=State.RESERVED, proxy=handle, busy=None,
                                  cert_fingerprint=fingerprint, certificate=certificate,
                                  lease_expires=time.time() + lease_s)
                stream = self.store.get(uid)
        except BaseException as exc:
            for sock in sockets:
                sock.close()
            try:
                if handle is not None:
                    backend.stop(handle, directory)
                backend.abandon(directory, uid)
            except ProxyError:
                # Busy with nobody: the next call's reap_abandoned tries the undo again.
                with self.store.transaction():
                    self.store.update(uid, busy=NOBODY)
            else:
                shutil.rmtree(directory, ignore_errors=True)
                with self.store.transaction():
                    self.store.delete(uid)
            if isinstance(exc, ProxyUnavailable):
                raise Unavailable(f"the {backend.name} proxy cannot start now: {exc}") from None
            if isinstance(exc, ProxyError):
                raise ConnError(f"could not start the {backend.name} proxy: {exc}") from None
            raise
        return self._reserve_reply(stream)

    def hello(self, raw: object) -> dict:
        req = HelloRequest.parse(raw, self.settings)
        uid, role, key = req.uid, req.role, req.key
        self.reap()
        with self.store.transaction():
            stream = self._lookup(uid)
            app_listeners = _checked_hello(stream, role, key, req.app_listeners,
                                           "app_listeners" in req.model_fields_set)
            if app_listeners is not None and stream.state == State.RESERVED:
                if stream.busy is not None:  # a connect carrying a hello; alive: reaped
                    raise Unavailable(f"a {stream.busy.get('op', 'call')} of stream {uid} "
                                      "is in progress; try again")
                self.store.update(uid, state=State.HELLO, app_listeners=app_listeners)
        return HelloReply(uid=uid, role=role, listeners=stream.listeners).wire()

    def wait_hello(self, raw: object) -> dict:
        req = WaitHelloRequest.parse(raw, self.settings)
        uid, timeout_s = req.uid, req.timeout_s
        self.reap()
        self._proven(uid, req.control)
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            stream = self._lookup(uid)
            if stream.state not in State.AWAITING_HELLO or time.monotonic() >= deadline:
                return WaitHelloReply(uid=uid, state=stream.state,
                                      app_listeners=stream.app_listeners).wire()
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)

    def connect(self, raw: object) -> dict:
        """Point the stream's proxy at its targets and pin the peer's certificate.

        Plain TCP (``tls: false``) on a gateway whose settings do not allow it is
        ``NOT_IMPLEMENTED``, the code of a feature this gateway does not offer (as for a
        backend that cannot relay without TLS): the request is well formed and the
        caller proved nothing wrong. A repeat connect is a success only with the same
        listeners, ``tls`` and peer fingerprint (the certificate is checked against the
        fingerprint, so the same fingerprint is the same certificate); another peer is
        ``AUTH_ERROR``, since which peer the stream trusts is an authentication
        decision, and the pinned one stays.

        The producer's connect may carry its hello (``hello``: key and app_listeners,
        checked as ``hello`` checks them): the stream goes from RESERVED to CONNECTED in
        one step, its app_listeners recorded with the outcome, so a refused or failed
        connect leaves it RESERVED."""
        req = ConnectRequest.parse(raw, self.settings)
        uid, tls, remote = req.uid, req.tls, req.remote_listeners
        if not tls and not self.settings.allow_plain_tcp:
            raise NotImplementedHere(f"gateway {self.settings.name} does not allow plain TCP "
                                     "between gateways (allow_plain_tcp = false); connect "
                                     "with TLS")
        peer_fp = peer_cert = None
        if tls:
            peer_fp, peer_cert = req.peer_fingerprint, req.peer_certificate
            try:
                actual = fingerprint_of_pem(peer_cert)
            except ValueError as exc:
                raise BadFormat(f"peer_certificate: {exc}") from None
            if not hmac.compare_digest(actual, peer_fp):
                raise AuthError("peer_certificate does not match peer_fingerprint")
        self.reap()
        with self.store.transaction():
            stream = self._proven(uid, req.control)
            backend = self.backend(stream.backend)
            if not tls and not backend.supports_plain:
                raise NotImplementedHere(f"backend {stream.backend} cannot relay without TLS")
            reply = ConnectReply(uid=uid, state=State.CONNECTED, listeners=stream.listeners,
                                 backend=stream.backend).wire()
            if stream.busy is not None:  # alive: reap_abandoned has just run
                raise Unavailable(f"a {stream.busy.get('op', 'call')} of stream {uid} is in "
                                  "progress; try again")
            app_listeners = stream.app_listeners
            if req.hello is not None:
                app_listeners = _checked_hello(stream, "PROD", req.hello.key,
                                               req.hello.app_listeners, True)
            if stream.state == State.CONNECTED:
                if stream.peer_fingerprint is not None and (
                        peer_fp is None
                        or not hmac.compare_digest(peer_fp, stream.peer_fingerprint)):
                    raise AuthError(f"stream {uid} is connected to another peer; its pinned "
                                    "certificate stays")
                if (stream.remote_listeners, stream.tls, stream.peer_fingerprint) == (
                        remote, tls, peer_fp):
                    return reply
                raise BadFormat(f"stream {uid} is already connected with other parameters")
            if stream.role == "PROD" and stream.state != State.HELLO and req.hello is None:
                raise InvalidUid(f"stream {uid} is {stream.state}: the producer's hello "
                                 "(its app_listeners) must come before connect, or with it")
            if stream.state not in (State.RESERVED, State.HELLO):
                raise InvalidUid(f"stream {uid} is {stream.state}")
            # Marked before the proxy changes: a worker dying from here on leaves a row
            # that the next call turns FAILED, its proxy stopped (reap_abandoned).
            self.store.update(uid, busy={**_this_worker(), "op": "connect"})
        directory = self.stream_dir(uid)
        try:
            self._fault_point("connect:marked")
            try:
                status = backend.status(stream.proxy, directory)
            except ProxyUnavailable as exc:  # e.g. no container engine to ask
                raise Unavailable(f"connect of stream {uid}: {exc}") from None
            if not status["alive"]:
                with self.store.transaction():  # recorded, then reported
                    self.store.update(uid, state=State.FAILED, busy=None,
                                      detail="proxy died before connect")
                raise ConnError(f"the proxy of stream {uid} is not running")
            if peer_cert is not None:
                (directory / PEER_CERT_FILE).write_text(peer_cert)
            targets = app_listeners if stream.role == "PROD" else remote
            try:
                handle = backend.connect(stream.proxy, directory, targets=targets, tls=tls,
                                         peer_cert_file=PEER_CERT_FILE if tls else None,
                                         peer_fingerprint=peer_fp)
            except ProxyError as exc:
                (directory / PEER_CERT_FILE).unlink(missing_ok=True)
                if isinstance(exc, ProxyUnavailable):
                    raise Unavailable(str(exc)) from None
                raise ConnError(str(exc)) from None
            self._fault_point("connect:proxy-connected")
            with self.store.transaction():
                self.store.update(uid, state=State.CONNECTED, remote_listeners=remote,
                                  tls=int(tls), peer_fingerprint=peer_fp,
                                  app_listeners=app_listeners,
                                  proxy=handle or stream.proxy, busy=None)
        except BaseException:
            # The stream stays as it was (a failed connect may be tried again) unless
            # it was recorded FAILED above; the mark goes either way.
            with self.store.transaction():
                if self.store.get(uid).busy is not None:
                    self.store.update(uid, busy=None)
            raise
        return reply

    def status(self, raw: object) -> dict:
        """The stream's state, proxy and counters; nothing at all without the proof."""
        req = StreamRequest.parse(raw, self.settings)
        uid = req.uid
        self.reap()
        stream = self._proven(uid, req.control)
        reply = {"uid": uid, "role": stream.role, "state": stream.state, "alive": False,
                 "bytes": None, "lease_expires": stream.lease_expires,
                 "listeners": stream.listeners, "detail": stream.detail}
        if stream.proxy is not None:
            proxy = self._proxy_status(stream)
            reply.update(alive=proxy["alive"], bytes=proxy.get("bytes"),
                         connections=proxy.get("connections"), pid=proxy.get("pid"))
            if proxy.get("detail"):  # e.g. which counters this backend does not expose
                reply["proxy_detail"] = proxy["detail"]
            if proxy.get("last_error"):  # the last relayed connection that failed, and why
                reply["last_error"] = proxy["last_error"]
            # A proxy seen dead while a connect runs may be the one being replaced.
            if not proxy["alive"] and stream.state != State.FAILED and stream.busy is None:
                with self.store.transaction():
                    now = self.store.get(uid)
                    if now.state == stream.state and now.busy is None:
                        self.store.update(uid, state=State.FAILED, detail="proxy process is gone")
                        reply.update(state=State.FAILED, detail="proxy process is gone")
        if reply["state"] == State.FAILED:
            reply["error_code"] = "CONN_ERROR"
            reply.setdefault("last_error", reply["detail"])
        elif reply.get("last_error") and (reply.get("connections") or {}).get("failed"):
            # Alive, but relayed connections failed (an unreachable or refusing peer).
            reply["error_code"] = "CONN_ERROR"
        return StatusReply(**reply).wire()

    def renew(self, raw: object) -> dict:
        req = RenewRequest.parse(raw, self.settings)
        uid, lease_s = req.uid, req.lease_s or self.settings.default_lease_s
        self.reap()
        with self.store.transaction():
            stream = self._proven(uid, req.control)
            if not stream.active:
                raise InvalidUid(f"stream {uid} is {stream.state}")
            expires = time.time() + lease_s
            self.store.update(uid, lease_expires=expires)
        return RenewReply(uid=uid, lease_expires=expires).wire()

    def release(self, raw: object) -> dict:
        """Stop the proxy, free the ports, delete the keys. An unknown uid is released
        already (idempotent); a known one needs the proof."""
        req = StreamRequest.parse(raw, self.settings)
        self.reap()
        if self.store.get(req.uid) is not None:  # proven before waiting for a busy stream
            self._proven(req.uid, req.control)
        return self._release(req.uid, req.control)

    def list_streams(self, raw: object) -> dict:
        """The caller's active streams (and reserves in progress), newest first, at most
        ``MAX_LISTED``: those whose owner token hashes to the one given at reserve."""
        req = ListStreamsRequest.parse(raw, self.settings)
        self.reap()
        rows = self.store.streams(State.HOLDING, owner_sha256=_sha256(req.owner),
                                  limit=MAX_LISTED)
        return ListStreamsReply(streams=[self._summary(st) for st in rows]).wire()

    # -- the operator's calls (scistream-gateway; never over the wire) ---------------
    def operator_streams(self, everything: bool = False) -> list[StreamSummary]:
        """Every owner's active streams (``everything``: ended ones too), newest first."""
        self.reap()
        rows = self.store.streams(None if everything else State.HOLDING)
        return [self._summary(st) for st in rows]

    def operator_release(self, uid: str) -> dict:
        """``release`` without the proof: the operator owns the node."""
        if not is_canonical_uid(uid):
            raise BadFormat(f"uid must be a lowercase canonical UUID, not {uid!r:.80}")
        self.reap()
        return self._release(uid, None, operator=True)

    def _summary(self, stream: StreamRow) -> StreamSummary:
        counters = None
        if stream.proxy is not None and stream.busy is None:
            try:
                counters = self._proxy_status(stream).get("bytes")
            except Unavailable:
                pass  # its engine is away now: no counters to show
        return StreamSummary(uid=stream.uid, role=stream.role, state=stream.state,
                             created=stream.created, lease_expires=stream.lease_expires,
                             bytes=counters)

    def _proxy_status(self, stream: StreamRow) -> dict:
        try:
            return self.backend(stream.backend).status(stream.proxy,
                                                       self.stream_dir(stream.uid))
        except ProxyUnavailable as exc:  # e.g. no container engine to ask
            raise Unavailable(f"status of stream {stream.uid}: {exc}") from None

    def _release(self, uid: str, control: str | None, *, operator: bool = False) -> dict:
        """Release ``uid``, proving ``control`` (unless for the ``operator``) on the row
        as it is inside the transaction, which a reserve may have created meanwhile."""
        self._wait_not_busy(uid)
        with self.store.transaction():
            stream = self.store.get(uid)
            if stream is not None and not operator:
                _prove(stream, control)
            if stream is not None and stream.busy is not None:
                raise Unavailable(f"a {stream.busy.get('op', 'call')} of stream {uid} is still"
                                  f" in progress after {RELEASE_WAIT_S:.0f} s; release again")
            if stream is not None and stream.active:
                try:
                    self._cleanup(stream, State.RELEASED)
                except ProxyUnavailable as exc:  # nothing changed: release again later
                    raise Unavailable(f"cannot release stream {uid} now: {exc}") from None
        return ReleaseReply(uid=uid, released=True).wire()

    def _wait_not_busy(self, uid: str) -> None:
        """Wait (up to RELEASE_WAIT_S) for a reserve or connect of ``uid`` to end; undo
        it if its worker dies meanwhile."""
        deadline = time.monotonic() + RELEASE_WAIT_S
        delay = 0.005
        while time.monotonic() < deadline:
            stream = self.store.get(uid)
            if stream is None or stream.busy is None:
                return
            if not busy_alive(stream.busy):
                self.reap_abandoned()
                continue
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
