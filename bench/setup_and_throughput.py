"""Stream setup time and chain-vs-direct throughput with two local gateways on loopback.

    .venv/bin/python bench/setup_and_throughput.py [--streams 30] [--rounds 3] [--json]

Setup: ``--streams`` streams opened and released one after another inside one running
flow (Prefect task runs, both local gateways, proxies accepting): the distribution of
``setup_s`` (first reserve to both proxies accepting).

Throughput: the stand-in apps (``scistream_proxy.apps``: generated data, SHA-256 on
both ends) send ``--bytes`` over ``--num-conn`` connections, directly (A) and through
consumer proxy -> TLS 1.3 -> producer proxy (B), alternating A B A B for ``--rounds``
rounds; medians and the ratio B/A from the same run. Both sides hash every byte, so
this measures the chain as apps see it, not the proxies' ceiling (that is iperf3's job
in the full benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from prefect import flow  # noqa: E402

from scistream_prefect import (  # noqa: E402
    LocalGateway,
    LocalPair,
    setup_stream,
    teardown_stream,
)
from scistream_prefect.cli import parse_size  # noqa: E402
from scistream_proxy import apps  # noqa: E402

def _consume(listeners: list[str], total: int) -> float:
    """Gbit/s the consumer app saw; raises if it did not get every byte."""
    started = time.perf_counter()
    out = subprocess.run([*apps.COMMAND, "consumer", *listeners], capture_output=True,
                         text=True, check=True).stdout
    seconds = time.perf_counter() - started
    got = sum(c["bytes"] for c in apps.connection_results(out))
    if got != total:
        raise RuntimeError(f"consumer got {got} of {total} bytes")
    return total * 8 / seconds / 1e9


@flow(name="bench-setup-and-throughput")
def bench(producer: LocalGateway, consumer: LocalGateway, streams: int, rounds: int,
          total: int, num_conn: int) -> dict:
    idle, app = apps.start_producer(1, 0)  # setup needs a hello target, not data
    setups = []
    try:
        for _ in range(streams):
            handle = setup_stream(producer, consumer, num_conn=num_conn, app_listeners=app)
            setups.append(handle.setup_s)
            teardown_stream(producer, consumer, handle.uid)
    finally:
        idle.kill()
        idle.wait()

    direct, chain = [], []
    for _ in range(rounds):
        proc, app = apps.start_producer(num_conn, total)  # A: consumer straight to the producer
        direct.append(_consume(app * num_conn, total))
        proc.wait()
        proc, app = apps.start_producer(num_conn, total)  # B: through both gateways
        handle = setup_stream(producer, consumer, num_conn=num_conn, app_listeners=app)
        try:
            chain.append(_consume(handle.listeners, total))
        finally:
            teardown_stream(producer, consumer, handle.uid)
            proc.wait()

    quantiles = statistics.quantiles(setups, n=20) if len(setups) > 1 else setups * 19
    return {
        "setup_s": {"n": len(setups), "p50": statistics.median(setups), "p95": quantiles[18],
                    "min": min(setups), "max": max(setups)},
        "throughput_gbit_s": {"bytes": total, "num_conn": num_conn, "rounds": rounds,
                              "direct": statistics.median(direct),
                              "tls_chain": statistics.median(chain),
                              "ratio_chain_to_direct":
                                  statistics.median(chain) / statistics.median(direct),
                              "direct_runs": direct, "tls_chain_runs": chain},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=30, help="streams for the setup figure")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds for throughput")
    parser.add_argument("--bytes", type=parse_size, default=512 * 2**20,
                        help="data per throughput run (default 512MiB)")
    parser.add_argument("--num-conn", type=int, default=4, help="connections per stream")
    parser.add_argument("--port-base", type=int, default=29000,
                        help="gateway ports base..base+199 (default below the ephemeral range)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scistream-bench-") as root, \
            LocalPair.create(root, name="bench", port_base=args.port_base, ports=100) as pair:
        pair.warm_up()
        result = bench(pair.producer, pair.consumer, args.streams, args.rounds, args.bytes,
                       args.num_conn)

    if args.json:
        print(json.dumps(result))
        return 0
    s, t = result["setup_s"], result["throughput_gbit_s"]
    print(f"stream setup inside a running flow, {s['n']} streams of {args.num_conn} connections:"
          f" p50 {s['p50']:.3f} s, p95 {s['p95']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f})")
    print(f"throughput, {t['bytes'] / 2**20:.0f} MiB over {t['num_conn']} connections, "
          f"median of {t['rounds']} alternating rounds:")
    print(f"  direct (app to app)          {t['direct']:6.2f} Gbit/s")
    print(f"  through both gateways (TLS)  {t['tls_chain']:6.2f} Gbit/s"
          f"   = {t['ratio_chain_to_direct']:.2f} x direct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
