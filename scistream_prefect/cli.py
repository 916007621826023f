"""The ``scistream`` command."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 10**6, "MB": 10**6,
          "MIB": 2**20, "G": 10**9, "GB": 10**9, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"1GiB"``, ``"256MiB"``, ``"500MB"`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1GiB, 256MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [{low}, {high}]")
        return value
    return parse


def _prefect_defaults() -> None:
    """Settings the embedded Prefect server needs here, unless the user chose otherwise."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A cold ephemeral server can take 12 s or more to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _demo(args: argparse.Namespace) -> int:
    from scistream_prefect.flows.demo import run_demo

    if not args.json:
        print(f"scistream demo: {args.bytes / 2**20:.0f} MiB over {args.num_conn} connections, "
              f"{'TLS 1.3' if args.tls else 'NO encryption (asked by --no-tls)'} between two "
              "local gateways", file=sys.stderr, flush=True)
    summary = run_demo(total_bytes=args.bytes, num_conn=args.num_conn, tls=args.tls,
                       port_base=args.port_base, show_progress=not args.json, keep=args.keep)
    if args.json:
        print(json.dumps(summary))
    else:
        verdict = "OK" if summary["checksum_ok"] else "MISMATCH"
        leaks = ("none" if summary["clean"] else
                 f"{summary['leaked_processes']} processes, {summary['held_ports']} ports, "
                 f"{summary['active_streams']} streams, "
                 f"{summary['leftover_stream_dirs']} key directories")
        print(f"\nstream {summary['uid']}\n"
              f"  setup (reserve ‖ reserve, hello, connect ‖ connect): {summary['setup_s']:.3f} s\n"
              f"  moved: {summary['bytes'] / 2**20:.1f} MiB in {summary['seconds']:.2f} s"
              f" = {summary['throughput_gbit_s']:.2f} Gbit/s\n"
              f"  checksums: {verdict}\n"
              f"  left after release: {leaks}")
    return 0 if summary["checksum_ok"] and summary["clean"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scistream",
        description="SciStream on Prefect and Globus Compute: authenticated, fast TCP "
        "streams between facilities.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="stream data for real between two local gateways on loopback",
        description="Start two local gateways, a producer app and a consumer app; open a "
        "stream with a Prefect flow, move the data through both proxies (TLS between them), "
        "verify checksums, release, and check that nothing is left. Exits 1 if the "
        "checksums differ or anything leaked, 2 on a bad argument or a gateway error.",
    )
    demo.add_argument("--bytes", type=parse_size, default=2**30,
                      help="data to send (default 1GiB; e.g. 256MiB)")
    demo.add_argument("--num-conn", type=_int_in(1, 64), default=4,
                      help="parallel connections (default 4)")
    demo.add_argument("--no-tls", dest="tls", action="store_false",
                      help="turn OFF encryption between the gateways")
    demo.add_argument("--port-base", type=_int_in(1024, 65535 - 199), default=31000,
                      help="gateway ports: producer base..base+99, consumer base+100..base+199")
    demo.add_argument("--json", action="store_true",
                      help="print the summary as one JSON object (no progress)")
    demo.add_argument("--keep", action="store_true", help="keep the gateways' state directories")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults()
    from scistream_gateway.errors import SciStreamError

    try:
        return args.handler(args)
    except SciStreamError as exc:  # expected failures: a message with its code, no traceback
        print(f"scistream {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
