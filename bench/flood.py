"""The WAN listener under abuse: one stream's throughput undisturbed and while another
stream of the same native relay is flooded, side by side in one run.

    .venv/bin/python bench/flood.py [--idle 2000] [--stalled 50] [--trickling 50]
        [--garbage 50] [--conns 4] [--seconds 5] [--rounds 3] [--json]

A pair of local gateways (default settings: handshake_timeout_s 5, 64 pending
handshakes per relay, 16 per stream) holds two TLS streams to one iperf3 server. Each
round runs iperf3 through stream B undisturbed, then again while stream A's producer
listener is flooded (``--idle`` connections held open, ClientHellos stalled halfway or
trickled a byte every 0.5 s, garbage); the producer relay's threads, RSS and
descriptors are sampled throughout. After each flood the attackers leave and the time
until the relay is back to its threads and descriptors before the flood is measured
(recovery). Reports the medians over rounds and the ratio flooded / undisturbed (the
goal: at least 0.8). Needs iperf3. The figures are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from scistream_prefect import LocalPair
from scistream_proxy.leaks import proxy_pids

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from relaykit import Flood, Peak, raise_fd_limit, settle, usage  # noqa: E402 - the tests' kit


def recovery_s(relay: int, base, timeout_s: float = 120.0) -> float | None:
    """Seconds until ``relay`` holds no more threads and descriptors than ``base``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        now = usage(relay)
        if now.threads <= base.threads and now.fds <= base.fds:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--stalled", type=int, default=50)
    parser.add_argument("--trickling", type=int, default=50)
    parser.add_argument("--garbage", type=int, default=50)
    parser.add_argument("--conns", type=int, default=4, help="iperf3 -P through stream B")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port-base", type=int, default=33000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    missing = benchlib.iperf3_missing()
    if missing:
        parser.error(missing)
    fd_limit = raise_fd_limit()  # the flood's sockets; the relay inherits it too
    runs: dict[str, list] = {"undisturbed": [], "flooded": [], "recovery_s": [], "peak": []}
    with tempfile.TemporaryDirectory(prefix="scistream-flood-") as tmp, \
            benchlib.IperfServer(args.port_base) as iperf, \
            LocalPair.create(tmp, name="flood", port_base=args.port_base + 10,
                             ports=20) as pair:
        flooded = pair.open([iperf.address])
        other = pair.open([iperf.address])
        try:
            (relay,) = proxy_pids(under=Path(tmp) / "producer-gw")
            benchlib.iperf3(other.listeners[0], args.conns, 1)  # warm-up
            for _ in range(args.rounds):
                base = settle(lambda: usage(relay))  # B's last connections have ended
                runs["undisturbed"].append(
                    benchlib.iperf3(other.listeners[0], args.conns, args.seconds)["gbit_s"])
                flood = Flood(flooded.prod["listeners"][0], idle=args.idle,
                              stalled=args.stalled, trickling=args.trickling,
                              garbage=args.garbage)
                try:
                    with Peak(relay) as peak:
                        runs["flooded"].append(benchlib.iperf3(
                            other.listeners[0], args.conns, args.seconds)["gbit_s"])
                finally:
                    flood.close()
                runs["peak"].append({"base": base.__dict__, "peak": peak.peak.__dict__})
                runs["recovery_s"].append(recovery_s(relay, base))
            counted = flooded.status()[0]["connections"]
        finally:
            flooded.release()
            other.release()
    undisturbed, under_flood = (statistics.median(runs[k]) for k in ("undisturbed", "flooded"))
    result = {
        "attack": {k: getattr(args, k) for k in ("idle", "stalled", "trickling", "garbage")},
        "iperf3": {"conns": args.conns, "seconds": args.seconds, "rounds": args.rounds},
        "gbit_s": {"undisturbed": undisturbed, "flooded": under_flood},
        "ratio": under_flood / undisturbed if undisturbed else None,
        "relay": {
            "threads": [p["base"]["threads"] for p in runs["peak"]],
            "threads_peak": max(p["peak"]["threads"] for p in runs["peak"]),
            "rss_kib": [p["base"]["rss_kib"] for p in runs["peak"]],
            "rss_kib_peak": max(p["peak"]["rss_kib"] for p in runs["peak"]),
            "fds_peak": max(p["peak"]["fds"] for p in runs["peak"]),
            "fd_limit": fd_limit,
        },
        "recovery_s": runs["recovery_s"],
        "flooded_stream": {k: counted[k] for k in (
            "handshakes_refused", "handshakes_timed_out", "capped", "total", "failed")},
        "runs": {k: runs[k] for k in ("undisturbed", "flooded")},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        relay_use = result["relay"]
        print(f"stream B, iperf3 -P {args.conns}, {args.seconds} s x {args.rounds} rounds: "
              f"{undisturbed:.2f} Gbit/s undisturbed, {under_flood:.2f} Gbit/s while stream "
              f"A is flooded: ratio {result['ratio']:.2f}")
        print(f"relay: threads {relay_use['threads']} before, {relay_use['threads_peak']} at "
              f"peak; RSS {[r // 1024 for r in relay_use['rss_kib']]} MiB before, "
              f"{relay_use['rss_kib_peak'] // 1024} MiB at peak; descriptors "
              f"{relay_use['fds_peak']} at peak (limit {fd_limit})")
        print("Gbit/s per round, undisturbed / flooded: " + ", ".join(
            f"{a:.2f} / {b:.2f}" for a, b in zip(runs["undisturbed"], runs["flooded"],
                                                  strict=True)))
        print("back to its threads and descriptors after the attackers left: "
              + ", ".join(f"{r:.1f} s" if r is not None else "not within 120 s"
                          for r in runs["recovery_s"]))
        print(f"stream A counted: {result['flooded_stream']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
