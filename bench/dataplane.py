"""Data plane: iperf3 through the same two-gateway chain for every S2DS backend, against
iperf3 direct, in one run.

    .venv/bin/python bench/dataplane.py [--quick] [--rounds 5] [--seconds 5]
        [--conns 1,4,64] [--modes tls,plain] [--backends native,stunnel,haproxy,...]
        [--port-base 16000] [--out bench/results] [--no-floor] [--json]

Chain: iperf3 client -> consumer-side proxy -> (TLS | plain TCP) -> producer-side proxy
-> iperf3 server, all on loopback, both gateways local (real gateway functions, real
proxies), one stream per backend and mode, opened before the first round and released
after the last. Each round runs every configuration once in the same order (direct,
then each chain; A B A B ...), so a change in the machine's load touches all alike;
the figures are medians over the rounds. Reported: Gbit/s received, the ratio to
direct, native's ratio to every other backend, the proxies' CPU (100 % = one core, both
ends together) and peak RSS / PSS during the runs, and the TLS suite the producer-side
listener picks. Container backends need a Docker engine whose host network is this
process's; otherwise they are listed as skipped with the reason.

The floor (plain mode, unless ``--no-floor``): the same chain through two minimal C
relays (``bench/floor_relay.c``, built with ``cc``: a thread per direction moving bytes
with blocking ``splice`` or ``read``/``write``, and nothing else), measured in the same
rounds: what any proxy can reach on this machine's loopback.

``--quick`` (2 rounds of 2 s) takes about three minutes on two cores; the figures of a
quick run on a shared machine are rough. Results: ``<out>/dataplane[-quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from scistream_prefect import LocalPair

ALL_BACKENDS = ["native", "stunnel", "haproxy", "nginx", "haproxy-docker", "nginx-docker"]
# Reference chains of two minimal C relays (not backends: no gateway, no TLS, no control).
FLOOR_MODES = ["splice", "copy"]
PORTS_PER_GATEWAY = 10


def _conn_label(n: int) -> str:
    return f"{n} conn" if n == 1 else f"{n} conns"


def open_chains(args, root: Path, target: str, result: dict, opened: list,
                pairs: contextlib.ExitStack) -> dict:
    """One stream per usable backend and mode, to ``target``; each goes on ``opened``,
    each backend's pair of gateways on ``pairs``."""
    from scistream_proxy.backends import BACKENDS
    from scistream_proxy.relay_files import OPENSSL_CONF_FILE

    chains = {"direct": {"backend": "direct", "mode": "-", "address": target, "pids": []}}
    for index, name in enumerate(args.backends):
        reason = benchlib.backend_skip_reason(name)
        if reason:
            result["skipped"][name] = reason
            print(f"{name}: skipped ({reason})", file=sys.stderr)
            continue
        base = args.port_base + 10 + 2 * PORTS_PER_GATEWAY * index
        pair = pairs.enter_context(LocalPair.create(
            root / name, name=name, port_base=base, ports=PORTS_PER_GATEWAY, backend=name,
            allow_plain_tcp="plain" in args.modes))
        pair.warm_up()
        for mode in args.modes:
            if mode == "plain" and not BACKENDS[name].supports_plain:
                result["skipped"][f"{name} plain"] = "the backend relays TLS only"
                continue
            chain = pair.open([target], tls=mode == "tls")
            opened.append(chain)
            label = f"{name} {mode}"
            pids = sorted(benchlib.chain_pids(chain))
            chains[label] = {"backend": name, "mode": mode, "address": chain.listeners[0],
                             "pids": pids, "setup_s": round(chain.seconds, 4),
                             "uid": chain.uid}
            if mode == "tls":
                chains[label]["tls_suite"] = benchlib.tls_suite(
                    chain.prod["listeners"][0], OPENSSL_CONF_FILE if name == "native" else None)
    return chains


def open_floors(args, root: Path, target: str, result: dict, chains: dict,
                floors: contextlib.ExitStack) -> None:
    """The floor under every plain chain: two minimal C relays (bench/floor_relay.c),
    splicing or copying, chained to ``target`` like a plain stream's two proxies."""
    if "plain" not in args.modes or not args.floor:
        return
    reason = benchlib.floor_missing()
    if reason:
        result["skipped"]["floor"] = reason
        print(f"floor: skipped ({reason})", file=sys.stderr)
        return
    for index, mode in enumerate(FLOOR_MODES):
        ports = (args.port_base + 1 + 2 * index, args.port_base + 2 + 2 * index)
        floor = floors.enter_context(benchlib.FloorChain(mode, ports, target, root))
        chains[f"floor-{mode} plain"] = {"backend": f"floor-{mode}", "mode": "plain",
                                         "address": floor.address, "pids": floor.pids}


def run(args) -> dict:
    result: dict = {
        "bench": "dataplane", "quick": args.quick,
        "config": {"rounds": args.rounds, "seconds": args.seconds, "conns": args.conns,
                   "modes": args.modes, "backends": args.backends, "floor": args.floor,
                   "port_base": args.port_base},
        "machine": benchlib.machine(), "skipped": {}, "errors": [], "chains": {},
        "results": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scistream-bench-dataplane-") as tmp, \
            benchlib.IperfServer(args.port_base) as server, contextlib.ExitStack() as floors, \
            contextlib.ExitStack() as pairs:
        opened: list = []
        try:
            chains = open_chains(args, Path(tmp), server.address, result, opened, pairs)
            open_floors(args, Path(tmp), server.address, result, chains, floors)
            configs = [(label, n) for n in args.conns for label in chains]

            def one(config, index):
                label, n = config
                chain = chains[label]
                measured = benchlib.iperf3(chain["address"], n, args.seconds, chain["pids"])
                print(f"round {index + 1}/{args.rounds}  {label:22} {_conn_label(n):9} "
                      f"{measured['gbit_s']:7.2f} Gbit/s", file=sys.stderr, flush=True)
                return measured

            def failed(config, exc):
                result["errors"].append(f"{config[0]} x{config[1]}: {exc}")
                print(f"error: {config[0]} x{config[1]}: {exc}", file=sys.stderr)

            runs = benchlib.alternate(args.rounds, configs, one, on_error=failed)
        finally:
            for chain in opened:
                _record_native_io(chain, chains)
                chain.release()
            left = benchlib.stop_leftovers(Path(tmp))
            if left:
                result["errors"].append(f"proxy processes left after release, killed: {left}")
    result["chains"] = {label: {k: v for k, v in chain.items()
                                if k not in ("address", "pids", "uid")}
                        | {"processes": len(chain["pids"])} for label, chain in chains.items()}
    summarize(result, runs, args.conns)
    result["seconds_total"] = round(time.monotonic() - started, 1)
    return result


def _record_native_io(chain, chains: dict) -> None:
    """How the native chain's connections moved their bytes, from the consumer end's
    status (TLS: sealed frames between two native relays, else TLS records)."""
    infos = [info for info in chains.values()
             if info.get("uid") == chain.uid and info["backend"] == "native"]
    if not infos:
        return
    try:
        conns = chain.pair.consumer.call("status", {"uid": chain.uid}).get("connections") or {}
    except Exception as exc:  # noqa: BLE001 - a figure of the report, never fatal
        conns = {"error": str(exc)}
    for info in infos:
        info["native_io"] = {k: conns[k] for k in ("total", "frames", "frames_aead", "bio",
                                                   "spliced", "ktls", "error") if k in conns}
        if info.get("tls_suite") and conns.get("frames"):
            info["tls_suite"] += (" handshake; data: AES-128-GCM sealed frames "
                                  f"({conns.get('frames_aead')})")


def summarize(result: dict, runs: dict, conns: list[int]) -> None:
    med = benchlib.median
    for (label, n), values in runs.items():
        if not values:
            continue
        mib = [v["proxy_rss_kib"] / 1024 if v["proxy_rss_kib"] is not None else None
               for v in values]
        pss = [v["proxy_pss_kib"] / 1024 if v["proxy_pss_kib"] is not None else None
               for v in values]
        result["results"].setdefault(label, {})[str(n)] = {
            "gbit_s": med(v["gbit_s"] for v in values),
            "runs_gbit_s": [round(v["gbit_s"], 3) for v in values],
            "proxy_cpu_pct": med(v["proxy_cpu_pct"] for v in values),
            "proxy_cpu_s_per_gb": med(v["proxy_cpu_s_per_gb"] for v in values),
            "proxy_rss_mib": med(mib),
            "proxy_pss_mib": med(pss),
        }
    direct = result["results"].get("direct", {})
    for by_n in result["results"].values():
        for n, cell in by_n.items():
            base = direct.get(n, {}).get("gbit_s")
            cell["ratio_to_direct"] = cell["gbit_s"] / base if base else None
    # native ÷ each other backend, same mode and connection count
    native_vs: dict = {}
    for label, by_n in result["results"].items():
        backend, _, mode = label.partition(" ")
        if backend in ("native", "direct"):
            continue
        mine = result["results"].get(f"native {mode}", {})
        for n, cell in by_n.items():
            if n in mine and cell["gbit_s"]:
                native_vs.setdefault(mode, {}).setdefault(n, {})[backend] = \
                    mine[n]["gbit_s"] / cell["gbit_s"]
    result["native_vs"] = native_vs
    result["checks"] = checks(result, conns).items


def checks(result: dict, conns: list[int]) -> benchlib.Checks:
    """The native proxy's targets (issue 7), on this run's ratios."""
    out = benchlib.Checks()
    res = result["results"]

    def gbit(label: str, n: int) -> float | None:
        return res.get(label, {}).get(str(n), {}).get("gbit_s")

    for n in conns:
        native = gbit("native tls", n)
        others = {label.split(" ")[0]: gbit(label, n) for label in res
                  if label.endswith(" tls") and not label.startswith("native ")}
        others = {k: v for k, v in others.items() if v}
        best = max(others, key=others.get) if others else None
        value = native / others[best] if native and best else None
        out.add(f"TLS chain >= 1.2x the best C proxy ({_conn_label(n)})", value, 1.2,
                f"native {_fmt(native)} Gbit/s vs best {best} {_fmt(others.get(best))}: "
                f"{_fmt(value)}x" if best else "no C proxy with TLS measured")
        native = gbit("native plain", n)
        haproxy = gbit("haproxy plain", n)
        value = native / haproxy if native and haproxy else None
        out.add(f"plain chain >= 1.0x HAProxy ({_conn_label(n)})", value, 1.0,
                f"native {_fmt(native)} vs haproxy {_fmt(haproxy)} Gbit/s: {_fmt(value)}x")
        direct = gbit("direct", n)
        value = native / direct if native and direct else None
        floors = {mode: gbit(f"floor-{mode} plain", n) for mode in FLOOR_MODES}
        floor = max((v for v in floors.values() if v), default=None)
        out.add(f"plain chain >= 0.6x direct ({_conn_label(n)})", value, 0.6,
                f"native {_fmt(native)} vs direct {_fmt(direct)} Gbit/s: {_fmt(value)}x"
                + (f"; two minimal C relays: {_fmt(floor / direct)}x" if floor and direct
                   else ""))
    for mode in ("tls", "plain"):
        native, haproxy = gbit(f"native {mode}", 64), gbit(f"haproxy {mode}", 64)
        value = native / haproxy if native and haproxy else None
        out.add(f"64 connections ({mode}) >= HAProxy", value, 1.0,
                f"native {_fmt(native)} vs haproxy {_fmt(haproxy)} Gbit/s: {_fmt(value)}x")
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict, label_line: str, readme: bool = False) -> str:
    """The result as Markdown; ``readme``: only the throughput and targets tables."""
    conns = result["config"]["conns"]
    res = result["results"]
    rounds = result["config"]["rounds"]
    lines = [] if readme else ["# Data plane benchmark", ""]
    lines += [label_line, "",
              f"iperf3 for {result['config']['seconds']} s per run, median of {rounds} "
              "alternating rounds; Gbit/s received (× direct from the same run). "
              "Method: [docs/benchmarks.md](../../docs/benchmarks.md).", ""]
    rows = []
    for label, chain in result["chains"].items():
        cells = []
        for n in conns:
            cell = res.get(label, {}).get(str(n))
            if cell is None:
                cells.append("failed" if label in res or result["errors"] else "-")
            elif label == "direct":
                cells.append(f"{cell['gbit_s']:.2f}")
            else:
                cells.append(f"{cell['gbit_s']:.2f} ({_fmt(cell['ratio_to_direct'])}×)")
        rows.append([label, chain.get("tls_suite") or "", *cells])
    lines += [benchlib.markdown_table(["chain", "TLS suite", *map(_conn_label, conns)], rows),
              ""]
    if readme:
        lines += ["Native proxy targets (ratios from this run):", "",
                  benchlib.Checks(result["checks"]).markdown(), ""]
        return "\n".join(lines)
    if result["native_vs"]:
        lines += ["Native ÷ each other backend (same mode, same run):", ""]
        rows = []
        for mode, by_n in result["native_vs"].items():
            backends = sorted({b for cell in by_n.values() for b in cell})
            for backend in backends:
                rows.append([f"{backend} {mode}",
                             *[_fmt(by_n.get(str(n), {}).get(backend)) for n in conns]])
        lines += [benchlib.markdown_table(["vs", *map(_conn_label, conns)], rows), ""]
    lines += ["Proxy CPU (% of one core, both ends) and peak RSS / PSS (MiB, both ends) "
              "during the runs:", ""]
    rows = []
    for label in result["chains"]:
        if label == "direct":
            continue
        cells = []
        for n in conns:
            cell = res.get(label, {}).get(str(n))
            cells.append("-" if cell is None else
                         f"{_fmt(cell['proxy_cpu_pct'], 0)} % · {_fmt(cell['proxy_rss_mib'], 1)}"
                         f" / {_fmt(cell['proxy_pss_mib'], 1)}")
        rows.append([label, *cells])
    lines += [benchlib.markdown_table(["chain", *map(_conn_label, conns)], rows), ""]
    lines += ["Native proxy targets (ratios from this run):", "",
              benchlib.Checks(result["checks"]).markdown(), ""]
    if result["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()),
                  ""]
    if result["errors"]:
        lines += ["Errors: " + "; ".join(result["errors"]), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    conns, modes = result["config"]["conns"], result["config"]["modes"]
    groups = [(mode, n) for mode in modes for n in conns]
    backends = ["direct"] + [b for b in [*result["config"]["backends"],
                                         *(f"floor-{m}" for m in FLOOR_MODES)]
                             if any(label.startswith(b + " ") for label in result["results"])]
    series = {}
    for backend in backends:
        values = []
        for mode, n in groups:
            label = "direct" if backend == "direct" else f"{backend} {mode}"
            values.append(result["results"].get(label, {}).get(str(n), {}).get("gbit_s"))
        series[backend] = values
    title = (f"iperf3 through two local gateways, median of {result['config']['rounds']} "
             f"rounds{' (quick run)' if result['quick'] else ''}")
    return benchlib.plot_bars(path, [f"{mode}\n{_conn_label(n)}" for mode, n in groups],
                              series, title=title, ylabel="Gbit/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of 2 s (unless --rounds/--seconds say otherwise)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5; quick 2)")
    parser.add_argument("--seconds", type=int,
                        help="iperf3 -t per run, whole seconds (default 5; quick 2)")
    parser.add_argument("--conns", default="1,4,64", help="iperf3 -P values (default 1,4,64)")
    parser.add_argument("--modes", default="tls,plain", help="tls, plain or both")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS),
                        help=f"comma-separated (default: {','.join(ALL_BACKENDS)})")
    parser.add_argument("--port-base", type=int, default=16000,
                        help="iperf3 server port; the floor relays and the gateways take "
                        f"the next {10 + 2 * PORTS_PER_GATEWAY * len(ALL_BACKENDS)}")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR,
                        help="directory of the result files (default bench/results)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="leave out the floor: plain chains of two minimal C relays "
                        "(bench/floor_relay.c, built with cc), splicing and copying")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--update-readme", action="store_true",
                        help="also put the throughput and targets tables in README.md")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="run nothing: write the Markdown and plot of a saved result")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.seconds = args.seconds or (2 if args.quick else 5)
    args.conns = [int(c) for c in args.conns.split(",") if c]
    args.modes = [m for m in args.modes.split(",") if m]
    args.backends = [b for b in args.backends.split(",") if b]
    if set(args.modes) - {"tls", "plain"} or not args.modes:
        parser.error("--modes takes tls and/or plain")
    unknown = [b for b in args.backends if b not in ALL_BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; known: {ALL_BACKENDS}")
    if args.rounds < 1 or args.seconds <= 0 or not args.conns or min(args.conns) < 1:
        parser.error("--rounds, --seconds and --conns must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        label_line = result["label"]
    else:
        missing = benchlib.iperf3_missing()
        if missing:
            print(f"dataplane: {missing}", file=sys.stderr)
            return 2
        result = run(args)
        label_line = result["label"] = benchlib.run_label(
            args.quick, ["bench/dataplane.py", *(sys.argv[1:] if argv is None else argv)])
    stem = "dataplane-quick" if result["quick"] else "dataplane"
    return benchlib.publish(args, "dataplane", stem, result, markdown(result, label_line),
                            readme_text=markdown(result, label_line, True),
                            extra_files=[plot(result, args.out / f"{stem}.png")])


if __name__ == "__main__":
    sys.exit(main())
