"""The demo: a real stream between two local gateways on loopback, checked end to end.

A producer app sends generated data; a Prefect flow opens the stream (reserve on both
gateways, hello, connect on both); a consumer app reads everything through consumer
proxy -> TLS -> producer proxy; checksums are compared; the flow releases the stream;
and the demo checks that no proxy process, port or key file is left.
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
from scistream_prefect.tasks.streams import get_stream_status
from scistream_proxy import apps
from scistream_proxy.leaks import port_is_free, runs_a_proxy

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
    time and what each proxy process was (for the leak check after release).
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
        "listeners": handle.listeners + handle.producer_listeners,
        "consumer": apps.connection_results(out),
        "consumer_exit": consumer_app.returncode,
        "seconds": seconds,
        "proxies": [{"pid": s.get("pid"), "bytes": s.get("bytes"), "state": s["state"],
                     "alive": s["alive"]} for s in statuses],
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
    producer = LocalGateway.create("demo-producer-gw", root / "producer-gw",
                                   port_range=(port_base, port_base + 99))
    consumer = LocalGateway.create("demo-consumer-gw", root / "consumer-gw",
                                   port_range=(port_base + 100, port_base + 199))
    # A gateway's workers are long-lived (an endpoint keeps them warm); start ours
    # before the clock runs, so setup time measures the protocol, not process spawn.
    warmers = [threading.Thread(target=gw.warm_up) for gw in (producer, consumer)]
    for thread in warmers:
        thread.start()
    for thread in warmers:
        thread.join()
    producer_app, app_listeners = apps.start_producer(num_conn, total_bytes)
    try:
        run = stream_demo(producer, consumer, app_listeners, num_conn=num_conn,
                          total_bytes=total_bytes, tls=tls, show_progress=show_progress)
        out, _ = producer_app.communicate(timeout=60)
        sent = apps.connection_results(out)
    finally:
        if producer_app.poll() is None:
            producer_app.kill()
            producer_app.wait()

    received = run["consumer"]
    key = lambda r: (r.get("bytes", -1), r.get("sha256", ""))  # noqa: E731
    checksum_ok = (run["consumer_exit"] == 0 and len(received) == num_conn
                   and sorted(map(key, sent)) == sorted(map(key, received)))
    total_received = sum(r.get("bytes", 0) for r in received)
    # Leak check: the proxies that ran are gone, their ports bind again, no stream is
    # active and no per-stream directory (keys, configs) is left on either gateway.
    leaked_processes = [p["pid"] for p in run["proxies"] if p["pid"] and runs_a_proxy(p["pid"])]
    held_ports = [a for a in run["listeners"] if not port_is_free(a)]
    infos = [gw.call("gateway_info", {}) for gw in (producer, consumer)]
    leftover_dirs = [str(p) for gw in (producer, consumer)
                     for p in (gw.settings.state_dir / "streams").iterdir()]
    summary = {
        "uid": run["uid"],
        "num_conn": num_conn,
        "tls": tls,
        "setup_s": round(run["setup_s"], 4),
        "bytes": total_received,
        "seconds": round(run["seconds"], 3),
        "throughput_gbit_s": round(total_received * 8 / run["seconds"] / 1e9, 3),
        "checksum_ok": checksum_ok,
        "proxy_bytes": [p["bytes"] for p in run["proxies"]],
        "leaked_processes": len(leaked_processes),
        "held_ports": len(held_ports),
        "active_streams": sum(i["active_streams"] for i in infos),
        "leftover_stream_dirs": len(leftover_dirs),
        "state_root": str(root) if keep else None,
    }
    summary["clean"] = not (leaked_processes or held_ports or summary["active_streams"]
                            or leftover_dirs)
    return summary

