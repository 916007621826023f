"""Setup time and throughput of every usable S2DS backend, each paired with itself.

    .venv/bin/python bench/backends.py [--backends native,haproxy,...] [--streams 10]
                                       [--bytes 512MiB] [--num-conn 4] [--json]

For each backend: two local gateways on loopback running it. Setup: ``--streams``
streams, each reserve ‖ reserve, hello, connect ‖ connect through the gateway
functions (no Prefect flow), timed from the first reserve until both proxies accept;
then released. Throughput: the stand-in apps (generated data, SHA-256 on both ends)
move ``--bytes`` over ``--num-conn`` TLS connections through both gateways, median of
``--rounds``. Container backends need a Docker engine at ``DOCKER_HOST`` and their
images; backends that cannot run here are listed with the reason.
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
from pathlib import Path

from scistream_prefect import LocalPair
from scistream_prefect.cli import parse_size
from scistream_proxy import apps
from scistream_proxy.backends import BACKENDS


def bench_backend(name: str, root: Path, port_base: int, streams: int, rounds: int,
                  total: int, num_conn: int) -> dict:
    with LocalPair.create(root / name, name=name, port_base=port_base, ports=40,
                          backend=name) as pair:
        return _bench_pair(pair, streams, rounds, total, num_conn)


def _bench_pair(pair: LocalPair, streams: int, rounds: int, total: int, num_conn: int) -> dict:
    name = pair.producer.settings.backend
    idle, idle_listeners = apps.start_producer(1, 0)
    setups = []
    try:
        for _ in range(streams):
            chain = pair.open(idle_listeners, num_conn=num_conn)
            setups.append(chain.seconds)
            chain.release()
    finally:
        idle.kill()
        idle.wait()
    runs = []
    for _ in range(rounds):
        app, listeners = apps.start_producer(num_conn, total)
        chain = pair.open(listeners, num_conn=num_conn)
        try:
            started = time.perf_counter()
            out = subprocess.run([*apps.COMMAND, "consumer", *chain.listeners],
                                 capture_output=True, text=True, check=True).stdout
            seconds = time.perf_counter() - started
            got = sum(c["bytes"] for c in apps.connection_results(out))
            if got != total:
                raise RuntimeError(f"{name}: consumer got {got} of {total} bytes")
            runs.append(total * 8 / seconds / 1e9)
        finally:
            chain.release()
            app.wait(timeout=60)
    setups.sort()
    return {
        "setup_s": {"p50": statistics.median(setups), "max": setups[-1], "n": len(setups)},
        "throughput_gbit_s": statistics.median(runs), "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated backend names (default: all)")
    parser.add_argument("--streams", type=int, default=10, help="streams timed for setup")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per backend")
    parser.add_argument("--bytes", default="512MiB", help="bytes per transfer")
    parser.add_argument("--num-conn", type=int, default=4)
    parser.add_argument("--port-base", type=int, default=19000,
                        help="first port; each backend takes 80")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    total = parse_size(args.bytes)
    names = [n for n in args.backends.split(",") if n]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; known: {list(BACKENDS)}")
    results: dict = {"bytes": total, "num_conn": args.num_conn, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="scistream-bench-backends-") as tmp:
        for index, name in enumerate(names):
            reason = BACKENDS[name].unavailable_reason()
            if reason:
                results["backends"][name] = {"skipped": reason}
            else:
                results["backends"][name] = bench_backend(
                    name, Path(tmp), args.port_base + 80 * index, args.streams, args.rounds,
                    total, args.num_conn)
            if not args.json:
                _print_one(name, results["backends"][name], total, args.num_conn)
    if args.json:
        print(json.dumps(results))
    return 0


def _print_one(name: str, result: dict, total: int, num_conn: int) -> None:
    if "skipped" in result:
        print(f"{name:15} skipped: {result['skipped']}")
        return
    setup = result["setup_s"]
    print(f"{name:15} setup p50 {setup['p50']:.3f} s (max {setup['max']:.3f}, n={setup['n']})"
          f"   {total / 2**20:.0f} MiB over {num_conn} TLS connections: "
          f"{result['throughput_gbit_s']:.2f} Gbit/s (median)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
