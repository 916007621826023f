"""Two local gateways on loopback, producer side and consumer side: the one harness the
demo, the tests and the benchmarks build their streams on."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scistream_prefect.gateways import LocalGateway
from scistream_proxy.leaks import port_is_free, proxy_pids

__all__ = ["Leftovers", "LocalPair", "PairStream"]


@dataclass(frozen=True)
class Leftovers:
    """What a pair's gateways still hold; false (all empty) once every stream is released."""

    processes: tuple[int, ...] = ()  # proxies and port holders below the state directories
    ports: tuple[str, ...] = ()  # addresses of the port ranges that are still bound
    stream_dirs: tuple[str, ...] = ()  # per-stream directories: keys, configs
    active_streams: int = 0  # streams the gateways still count as active

    def __bool__(self) -> bool:
        return bool(self.processes or self.ports or self.stream_dirs or self.active_streams)


@dataclass
class PairStream:
    """One stream on a pair, driven by direct gateway calls (no Prefect).

    ``prod`` and ``cons`` are the two ``reserve`` replies; ``seconds`` is the time from the
    first reserve until both proxies listened (set by :meth:`LocalPair.open`)."""

    pair: LocalPair
    uid: str
    key: str
    prod: dict
    cons: dict
    seconds: float | None = None

    @property
    def listeners(self) -> list[str]:
        """Where the consumer app connects."""
        return self.cons["listeners"]

    def connect(self, app_listeners: list[str], *, tls: bool = True,
                prod_peer: tuple[str, str] | None = None,
                cons_peer: tuple[str, str] | None = None) -> None:
        """connect ‖ connect, the producer's carrying its hello (``app_listeners``), as
        the client flow does it. ``*_peer`` = (certificate, fingerprint) to give that
        side instead of the real peer's (an impostor)."""
        producer, consumer = self.pair.producer, self.pair.consumer
        prod_peer = prod_peer or (self.cons["certificate"], self.cons["cert_fingerprint"])
        cons_peer = cons_peer or (self.prod["certificate"], self.prod["cert_fingerprint"])

        def request(remote: list[str], peer: tuple[str, str]) -> dict:
            if not tls:
                return {"uid": self.uid, "remote_listeners": remote, "tls": False}
            return {"uid": self.uid, "remote_listeners": remote,
                    "peer_certificate": peer[0], "peer_fingerprint": peer[1]}

        hello = {"hello": {"key": self.key, "app_listeners": app_listeners}}
        self.pair._both((producer, "connect",
                         {**request(self.cons["listeners"], prod_peer), **hello}),
                        (consumer, "connect", request(self.prod["listeners"], cons_peer)))

    def status(self) -> tuple[dict, dict]:
        """Both ends' ``status`` replies, producer's first."""
        return (self.pair.producer.call("status", {"uid": self.uid}),
                self.pair.consumer.call("status", {"uid": self.uid}))

    def release(self) -> None:
        """Release both ends concurrently (idempotent)."""
        self.pair.release(self.uid)


class LocalPair:
    """A producer-side and a consumer-side :class:`LocalGateway`, closed together.

    ``LocalPair.create(...)`` makes two new gateways; ``LocalPair(producer, consumer)``
    pairs two that exist. Leaving the ``with`` block (or :meth:`close`) releases every
    stream still on either gateway and stops both gateways' worker processes.

    Example:
        ```python
        from scistream_prefect import LocalPair

        with LocalPair.create("/tmp/pair", name="lab", port_base=29800, ports=20) as pair:
            stream = pair.open(["127.0.0.1:5000"])  # where the producer app listens
            print(stream.listeners)  # where the consumer app connects
            stream.release()
            assert not pair.leftovers()  # no proxy, bound port, key or active stream
        ```
    """

    def __init__(self, producer: LocalGateway, consumer: LocalGateway):
        self.producer, self.consumer = producer, consumer

    @classmethod
    def create(cls, root: str | Path, *, name: str = "local", port_base: int = 50000,
               ports: int = 100, workers: int = 2, call_timeout_s: float = 120.0,
               **settings: object) -> LocalPair:
        """Two new gateways, ``<name>-producer-gw`` in ``<root>/producer-gw`` on ports
        ``port_base`` .. ``port_base + ports - 1`` and ``<name>-consumer-gw`` in
        ``<root>/consumer-gw`` on the next ``ports``; ``settings`` (backend,
        rate_capacity, max_num_conn, ...) go to both."""
        root = Path(root)
        gateways = []
        for index, role in enumerate(("producer", "consumer")):
            low = port_base + index * ports
            created = LocalGateway.create(f"{name}-{role}-gw", root / f"{role}-gw",
                                          port_range=(low, low + ports - 1), **settings)
            gateways.append(LocalGateway(settings_path=created.settings_path, workers=workers,
                                         call_timeout_s=call_timeout_s))
        return cls(*gateways)

    def __enter__(self) -> LocalPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _both(self, *calls: tuple[LocalGateway, str, dict]) -> list[dict]:
        """Run ``(gateway, function, request)`` calls concurrently; raise the first
        failure in the order given, after all of them returned."""
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(gw.call, function, request) for gw, function, request in calls]
        return [future.result() for future in futures]

    def warm_up(self) -> None:
        """Start both gateways' workers now, so a first call does not pay for them."""
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(gw.warm_up) for gw in (self.producer, self.consumer)]:
                future.result()

    def reserve(self, num_conn: int, *, rate: int = 0) -> PairStream:
        """reserve ‖ reserve of a new stream; if either fails, both are released and the
        failure (the producer's first) raised."""
        uid, key = str(uuid.uuid4()), secrets.token_urlsafe(16)
        request = {"uid": uid, "num_conn": num_conn, "rate": rate,
                   "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
        try:
            prod, cons = self._both((self.producer, "reserve", {**request, "role": "PROD"}),
                                   (self.consumer, "reserve", {**request, "role": "CONS"}))
        except BaseException:
            self.release(uid)
            raise
        return PairStream(self, uid, key, prod, cons)

    def open(self, app_listeners: list[str], *, tls: bool = True,
             num_conn: int | None = None) -> PairStream:
        """reserve ‖ reserve, then connect ‖ connect with the producer's hello folded in,
        as the client flow does it; on a failure both ends are released and the failure
        raised."""
        started = time.perf_counter()
        stream = self.reserve(num_conn or len(app_listeners))
        try:
            stream.connect(app_listeners, tls=tls)
        except BaseException:
            stream.release()
            raise
        stream.seconds = time.perf_counter() - started
        return stream

    def release(self, uid: str) -> None:
        """Release stream ``uid`` on both gateways concurrently (idempotent)."""
        self._both((self.producer, "release", {"uid": uid}),
                  (self.consumer, "release", {"uid": uid}))

    def leftovers(self) -> Leftovers:
        """What either gateway still holds: proxy processes, bound ports of its range,
        stream directories, active streams (this asks each gateway, which reaps expired
        leases first)."""
        processes, ports, dirs, active = [], [], [], 0
        for gw in (self.producer, self.consumer):
            s = gw.settings
            processes += proxy_pids(under=s.state_dir)
            ports += [f"{host}:{port}" for host in sorted({s.lan_address, s.wan_address})
                      for port in range(s.port_min, s.port_max + 1)
                      if not port_is_free(f"{host}:{port}")]
            dirs += sorted(str(p) for p in self._stream_dirs(gw))
            active += gw.call("gateway_info", {})["active_streams"]
        return Leftovers(tuple(processes), tuple(ports), tuple(dirs), active)

    def close(self) -> None:
        """Release every stream still on either gateway, then stop both gateways' workers."""
        try:
            uids = {p.name for gw in (self.producer, self.consumer) for p in self._stream_dirs(gw)}
            for uid in sorted(uids):
                self.release(uid)
        finally:
            self.producer.close()
            self.consumer.close()

    @staticmethod
    def _stream_dirs(gw: LocalGateway) -> list[Path]:
        streams = gw.settings.state_dir / "streams"
        return list(streams.iterdir()) if streams.is_dir() else []
