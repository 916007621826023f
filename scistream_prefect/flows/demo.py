"""The demo: a real stream between two local gateways on loopback, checked end to end.

A producer app sends generated data; a Prefect flow opens the stream (reserve on both
gateways, connect on both, the producer's carrying its hello); a consumer app reads
everything through consumer proxy -> TLS -> producer proxy; checksums are compared;
the flow releases the stream; and the demo checks that no proxy process, port or key file is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable

from prefect import flow

from scistream_prefect.flows.streams import setup_stream, teardown_stream
from scistream_prefect.gateways import LocalGateway
from scistream_prefect.local_pair import LocalPair
from scistream_prefect.tasks.streams import get_stream_status
from scistream_proxy import apps

__all__ = ["run_demo", "stream_demo"]

def _read_progress(stream, on_progress: Callable[[int, float], None]) -> None:
    for line in stream:
        try:
            message = json.loads(line)
        except ValueError:
            print(line, end="", file=sys.stderr)  # the app's own complaint: pass it on
            continue
        if isinstance(message, dict) and "progress" in message:
            on_progress(message["progress"], message["seconds"])


@flow(name="scistream-demo")
def stream_demo(
    producer: LocalGateway,
    consumer: LocalGateway,
    app_listeners: list[str],
    num_conn: int = 4,
    total_bytes: int = 1 << 30,
    tls: bool = True,
    show_progress: bool = True,
) -> dict:
    """Open a stream, let the consumer app read everything through it, release it.

    Returns the consumer app's per-connection results, its timing, the stream's setup
    time and listeners, and each end's proxy (pid, bytes, state) before release.
    """
    handle = setup_stream(producer, consumer, num_conn=num_conn, app_listeners=app_listeners,
                          tls=tls)
    try:
        consumer_app = subprocess.Popen(
            [*apps.COMMAND, "consumer", *handle.listeners, "--progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

        def show(done: int, seconds: float) -> None:
            if show_progress:
                rate = done * 8 / seconds / 1e9 if seconds else 0.0
                print(f"  {done / 2**20:9.1f} / {total_bytes / 2**20:.1f} MiB"
                      f"   {rate:5.2f} Gbit/s", file=sys.stderr, flush=True)

        reader = threading.Thread(target=_read_progress, args=(consumer_app.stderr, show),
                                  daemon=True)
        started = time.perf_counter()
        reader.start()
        out = consumer_app.stdout.read()  # stderr belongs to the progress reader
        consumer_app.wait()
        seconds = time.perf_counter() - started
        reader.join(timeout=5)
        ends = [get_stream_status.submit(gw, handle.uid) for gw in (producer, consumer)]
        statuses = [f.result() for f in ends]
    finally:
        teardown_stream(producer, consumer, handle.uid)
    return {
        "uid": handle.uid,
        "setup_s": handle.setup_s,
        "setup_round_trips": handle.setup_round_trips,
        "listeners": handle.listeners + handle.producer_listeners,
        "consumer": apps.connection_results(out),
        "consumer_exit": consumer_app.returncode,
        "seconds": seconds,
        "proxies": [{"pid": s.pid, "bytes": s.bytes, "state": s.state.value,
                     "alive": s.alive} for s in statuses],
    }


def run_demo(
    *,
    total_bytes: int = 1 << 30,
    num_conn: int = 4,
    tls: bool = True,
    port_base: int = 31000,
    show_progress: bool = True,
    keep: bool = False,
) -> dict:
    """Run the whole demo and return its summary (see ``scistream demo --help``)."""
    root = Path(tempfile.mkdtemp(prefix="scistream-demo-"))
    try:
        return _run_demo_in(root, total_bytes=total_bytes, num_conn=num_conn, tls=tls,
                            port_base=port_base, show_progress=show_progress, keep=keep)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _run_demo_in(root: Path, *, total_bytes: int, num_conn: int, tls: bool, port_base: int,
                 show_progress: bool, keep: bool) -> dict:
    # Plain TCP between the gateways only when the demo is asked for it (--no-tls).
    with LocalPair.create(root, name="demo", port_base=port_base, ports=100,
                          allow_plain_tcp=not tls) as pair:
        # A gateway's workers are long-lived (an endpoint keeps them warm); start ours
        # before the clock runs, so setup time measures the protocol, not process spawn.
        pair.warm_up()
        producer_app, app_listeners = apps.start_producer(num_conn, total_bytes)
        try:
            run = stream_demo(pair.producer, pair.consumer, app_listeners, num_conn=num_conn,
                              total_bytes=total_bytes, tls=tls, show_progress=show_progress)
            out, _ = producer_app.communicate(timeout=60)
            sent = apps.connection_results(out)
        finally:
            if producer_app.poll() is None:
                producer_app.kill()
                producer_app.wait()
        # The flow released the stream: whatever either gateway still holds is a leak.
        left = pair.leftovers()

    received = run["consumer"]
    key = lambda r: (r.get("bytes", -1), r.get("sha256", ""))  # noqa: E731
    checksum_ok = (run["consumer_exit"] == 0 and len(received) == num_conn
                   and sorted(map(key, sent)) == sorted(map(key, received)))
    total_received = sum(r.get("bytes", 0) for r in received)
    return {
        "uid": run["uid"],
        "num_conn": num_conn,
        "tls": tls,
        "setup_s": round(run["setup_s"], 4),
        "setup_round_trips": run["setup_round_trips"],
        "bytes": total_received,
        "seconds": round(run["seconds"], 3),
        "throughput_gbit_s": round(total_received * 8 / run["seconds"] / 1e9, 3),
        "checksum_ok": checksum_ok,
        "proxy_bytes": [p["bytes"] for p in run["proxies"]],
        "leaked_processes": len(left.processes),
        "held_ports": len(left.ports),
        "active_streams": left.active_streams,
        "leftover_stream_dirs": len(left.stream_dirs),
        "state_root": str(root) if keep else None,
        "clean": not left,
    }
