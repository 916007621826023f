"""Quick side-by-side check of the native relay: iperf3 through each backend's chain vs
direct, and the native relay's idle memory per stream.

    .venv/bin/python bench/native_quick.py [--backends native,haproxy,nginx,stunnel]
        [--conns 1,4,64] [--rounds 3] [--seconds 3] [--idle-streams 1,20] [--json]

A backend entry ``native+NAME=VALUE`` runs the native proxy with NAME=VALUE in its
environment (e.g. ``native+OPENSSL_ia32cap=...``), beside the others, so two variants of
the relay are compared in one run.

Each backend runs on its own pair of local gateways (app -> consumer-side proxy ->
TLS or plain -> producer-side proxy -> iperf3 server); every configuration runs once
per round, in the same order each round (A B C ... A B C ...), and the median of the
rounds is reported with its ratio to direct iperf3 from the same run. Memory: RSS of
the native relay processes with N idle streams open (per stream = (RSS at N - RSS at
1) / (N - 1)). The full benchmark (every backend, CPU, plots) is bench/dataplane.py;
this one is the native proxy's own quick loop. Needs iperf3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from scistream_prefect import LocalGateway, LocalPair
from scistream_proxy.backends import BACKENDS
from scistream_proxy.leaks import proxy_pids


def idle_memory(root: Path, port_base: int, counts: list[int]) -> dict:
    """RSS of both gateways' native relays with N idle (connected, no traffic) streams."""
    producer = LocalGateway.create("mem-p", root / "mem-p",
                                   port_range=(port_base, port_base + 299))
    consumer = LocalGateway.create("mem-c", root / "mem-c",
                                   port_range=(port_base + 300, port_base + 599))
    uids, found = [], {}
    try:
        for n in sorted(counts):
            while len(uids) < n:
                uids.append(LocalPair(producer, consumer).open(["127.0.0.1:9"]).uid)
            time.sleep(0.5)
            pids = proxy_pids(under=root)
            found[n] = {"processes": len(pids), "rss_kib": benchlib.memory_kib(pids)["rss_kib"]}
    finally:
        for uid in uids:
            for gw in (producer, consumer):
                gw.call("release", {"uid": uid})
    lo, hi = min(counts), max(counts)
    # Two stream ends (one per gateway) per stream.
    per_end = (found[hi]["rss_kib"] - found[lo]["rss_kib"]) / (hi - lo) / 2 if hi > lo else None
    return {"by_streams": found, "per_stream_end_kib": per_end}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="native,haproxy,nginx,stunnel")
    parser.add_argument("--conns", default="1,4,64")
    parser.add_argument("--modes", default="tls,plain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--idle-streams", default="1,20",
                        help="stream counts for the memory figure ('' to skip)")
    parser.add_argument("--port-base", type=int, default=31000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("iperf3") is None:
        parser.error("needs iperf3 (apt-get install iperf3)")
    conns = [int(c) for c in args.conns.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    modes = [m == "tls" for m in args.modes.split(",") if m]
    results: dict = {"gbit_s": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="scistream-native-quick-") as tmp:
        root = Path(tmp)
        server = subprocess.Popen(["iperf3", "-s", "-p", str(args.port_base), "-B", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = f"127.0.0.1:{args.port_base}"
        chains: dict[str, str] = {"direct": target}
        roots: dict[str, Path] = {}
        opened = []
        try:
            time.sleep(0.3)
            for index, entry in enumerate(backends):
                # "native+NAME=VALUE+...": a variant whose proxies start with NAME=VALUE
                # in their environment (e.g. a relay setting), beside the plain "native".
                name, *settings = entry.split("+")
                reason = BACKENDS[name].unavailable_reason()
                if reason:
                    results["skipped"][entry] = reason
                    continue
                base = args.port_base + 10 + 80 * index
                saved = dict(os.environ)
                os.environ.update(setting.split("=", 1) for setting in settings)
                try:
                    plain = not all(modes)  # gateways allow plain TCP if it is measured
                    producer = LocalGateway.create(f"g{index}-p", root / f"g{index}" / "p",
                                                   port_range=(base, base + 39), backend=name,
                                                   allow_plain_tcp=plain)
                    consumer = LocalGateway.create(f"g{index}-c", root / f"g{index}" / "c",
                                                   port_range=(base + 40, base + 79),
                                                   backend=name, allow_plain_tcp=plain)
                    for tls in modes:
                        if not tls and not BACKENDS[name].supports_plain:
                            continue
                        chain = LocalPair(producer, consumer).open([target], tls=tls)
                        opened.append((producer, consumer, chain.uid))
                        chains[f"{entry}-{'tls' if tls else 'plain'}"] = chain.listeners[0]
                        roots[f"{entry}-{'tls' if tls else 'plain'}"] = root / f"g{index}"
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
            proxies = {chain: proxy_pids(under=path) for chain, path in roots.items()}
            runs: dict = {(c, n): [] for c in chains for n in conns}
            for _ in range(args.rounds):
                for n in conns:
                    for chain, address in chains.items():
                        try:
                            measured = benchlib.iperf3(address, n, args.seconds,
                                                       proxies.get(chain, []))
                            runs[(chain, n)].append((measured["gbit_s"],
                                                     measured["proxy_cpu_s_per_gb"] or 0.0))
                        except RuntimeError as exc:
                            results.setdefault("errors", []).append(f"{chain} x{n}: {exc}")
            for (chain, n), values in runs.items():
                if not values:
                    continue
                rates = [v[0] for v in values]
                results["gbit_s"].setdefault(chain, {})[n] = {
                    "median": statistics.median(rates), "runs": rates,
                    "proxy_cpu_s_per_gb": statistics.median(v[1] for v in values)}
        finally:
            for producer, consumer, uid in opened:
                for gw in (producer, consumer):
                    gw.call("release", {"uid": uid})
            server.kill()
            server.wait()
        if args.idle_streams and "native" in backends:
            counts = [int(c) for c in args.idle_streams.split(",")]
            results["native_idle_memory"] = idle_memory(root, args.port_base + 1000, counts)
    if args.json:
        print(json.dumps(results))
        return 0
    direct = results["gbit_s"]["direct"]
    width = max(16, *(len(chain) + 1 for chain in results["gbit_s"]))
    print(f"{'chain':{width}}" + "".join(f"{n:>9} conn  /direct cpu-s/GB" for n in conns))
    for chain, by_n in results["gbit_s"].items():
        if set(by_n) != set(conns) or set(direct) != set(conns):
            print(f"{chain:{width}} {json.dumps(by_n)}")
            continue
        cells = "".join(f"{by_n[n]['median']:9.2f} Gbit/s "
                        f"{by_n[n]['median'] / direct[n]['median']:5.2f} "
                        f"{by_n[n]['proxy_cpu_s_per_gb']:8.2f}" for n in conns)
        print(f"{chain:{width}}{cells}")
    for error in results.get("errors", []):
        print("error:", error)
    for name, reason in results["skipped"].items():
        print(f"{name}: skipped ({reason})")
    if "native_idle_memory" in results:
        print("native idle memory:", json.dumps(results["native_idle_memory"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
