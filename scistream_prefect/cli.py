"""The ``scistream`` command.

Exit codes: 0 success; 1 the demo found a checksum mismatch or a leak; 2 a bad argument
or an error. The last line on standard error is then ``scistream <command>: <CODE>:
<message>`` with a SciStream code: ``BAD_FORMAT`` for a bad argument, the gateway's code
for a gateway error, ``SERVER_ERR`` for anything unexpected. No traceback is shown
unless ``SCISTREAM_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys

from scistream_gateway.cli import DEBUG_ENV, CodedParser, run_coded


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _uid(text: str) -> str:
    from scistream_gateway.protocol import is_canonical_uid

    if not is_canonical_uid(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a lowercase canonical UUID")
    return text


def _address(text: str) -> str:
    from scistream_gateway.errors import BadFormat
    from scistream_gateway.protocol import parse_address

    try:
        parse_address(text, "address")
    except BadFormat as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


_USES_PREFECT = {"demo", "open", "status", "release", "hello", "serve"}


class _WithoutTraceback(logging.Formatter):
    """A console formatter that leaves out tracebacks (Prefect logs one for every failed
    task and flow run; the user gets the coded line instead)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _console_without_tracebacks() -> None:
    """Every console handler Prefect configured prints log lines without tracebacks
    (its API handler still sends them to the Prefect UI)."""
    import prefect  # noqa: F401 - configures Prefect's logging

    loggers = [logging.getLogger()] + [logger for logger in
                                       logging.root.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if (type(handler) is logging.StreamHandler or "Console" in type(handler).__name__) \
                    and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))


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


def _print(args: argparse.Namespace, data: object, text: str) -> None:
    print(json.dumps(data) if getattr(args, "json", False) else text)


def _login(args: argparse.Namespace) -> int:
    from scistream_gateway.errors import AuthError
    from scistream_prefect import auth

    if not sys.stdin.isatty():
        # The login flow asks for a code pasted back: without a terminal it would fail
        # reading it (or wait for ever on a pipe).
        raise AuthError("login needs a terminal (it asks you to paste a code); for headless "
                        "runs use a GlobusCredentials block or SCISTREAM_GLOBUS_CLIENT_ID/"
                        "_SECRET")
    auth.login(force=args.force)
    who = auth.whoami()
    print(f"logged in as {who.get('preferred_username')} ({who.get('sub')}); tokens in "
          f"{auth.token_file()}", file=sys.stderr)
    return 0


def _logout(args: argparse.Namespace) -> int:
    from scistream_prefect import auth

    auth.logout()
    print(f"logged out; tokens revoked and removed from {auth.token_file()}", file=sys.stderr)
    return 0


def _whoami(args: argparse.Namespace) -> int:
    from scistream_prefect import auth

    who = auth.whoami()
    _print(args, who, f"{who.get('preferred_username')} ({who.get('name') or '-'}, "
                      f"{who.get('sub')})")
    return 0


def _gateway(spec: str):
    from scistream_prefect.hello import resolve_gateway

    return resolve_gateway(spec)


def _key(args: argparse.Namespace):
    from scistream_prefect.hello import read_hello_key

    return read_hello_key(args.key_file, stdin=args.key_stdin)


def _hello(args: argparse.Namespace) -> int:
    from scistream_gateway.errors import BadFormat
    from scistream_prefect.hello import consumer_listeners, send_hello

    gateway = _gateway(args.gateway)
    key = _key(args)
    if args.role == "PROD":
        if not args.app_listener:
            raise BadFormat("a producer's hello gives --app-listener (where its app listens)")
        listeners = send_hello(gateway, args.uid, key, args.app_listener)
    else:
        listeners = consumer_listeners(gateway, args.uid, key)
    _print(args, {"uid": args.uid, "role": args.role, "listeners": listeners},
           "\n".join(listeners))
    return 0


def _open(args: argparse.Namespace) -> int:
    from scistream_gateway.errors import BadFormat
    from scistream_prefect.flows.streams import open_stream

    if not args.app_listener and not (args.uid and args.hello_key_block):
        raise BadFormat("give --app-listener (the flow sends the producer's hello), or "
                        "--uid and --hello-key-block for a producer controller's own hello")
    handle = open_stream(
        _gateway(args.producer), _gateway(args.consumer), num_conn=args.num_conn,
        rate=args.rate, app_listeners=args.app_listener or None, uid=args.uid,
        hello_key_block=args.hello_key_block, tls=args.tls, lease_s=args.lease,
        hello_timeout_s=args.hello_timeout,
    )
    data = handle.model_dump(mode="json")
    _print(args, data,
           f"stream {handle.uid} open ({handle.producer} -> {handle.consumer}, "
           f"{'TLS' if handle.tls else 'NO encryption'}, setup {handle.setup_s:.3f} s)\n"
           f"consumer app connects to: {' '.join(handle.listeners)}")
    return 0


def _each_gateway(args: argparse.Namespace, function: str) -> list[tuple[str, dict]]:
    from concurrent.futures import ThreadPoolExecutor

    gateways = [_gateway(spec) for spec in args.gateway]
    with ThreadPoolExecutor(len(gateways)) as pool:
        futures = [pool.submit(gw.call, function, {"uid": args.uid}) for gw in gateways]
        return [(gw.label, f.result()) for gw, f in zip(gateways, futures, strict=True)]


def _status(args: argparse.Namespace) -> int:
    ends = _each_gateway(args, "status")
    lines = []
    for label, s in ends:
        moved = s.get("bytes") or {}
        lines.append(f"{label}: {s['role']} {s['state']}, proxy {'alive' if s['alive'] else 'down'}"
                     f", {moved.get('from_app', 0) + moved.get('to_app', 0)} bytes, listeners "
                     f"{' '.join(s.get('listeners') or [])}")
    _print(args, {"uid": args.uid, "ends": {label: s for label, s in ends}}, "\n".join(lines))
    return 0


def _release(args: argparse.Namespace) -> int:
    ends = _each_gateway(args, "release")
    _print(args, {"uid": args.uid, "released": {label: r["released"] for label, r in ends}},
           "\n".join(f"{label}: released" for label, _ in ends))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from scistream_prefect.deployments import serve

    serve(limit=args.limit)
    return 0


def _add_key_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--key-file", metavar="PATH",
                        help="read the hello key from this file (mode 0600 or stricter)")
    source.add_argument("--key-stdin", action="store_true",
                        help="read the hello key from the first line of standard input")
    parser.epilog = ("The hello key is never an argument (other users can read command "
                     "lines): --key-file, --key-stdin, or the SCISTREAM_HELLO_KEY "
                     "environment variable.")


GATEWAY_HELP = ("a saved gateway block's name, or the path of a local gateway's settings "
                "file (gateway.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = CodedParser(
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
                      help="turn OFF encryption between the gateways (the demo's "
                      "gateways then allow plain TCP)")
    demo.add_argument("--port-base", type=_int_in(1024, 65535 - 199), default=31000,
                      help="gateway ports: producer base..base+99, consumer base+100..base+199")
    demo.add_argument("--json", action="store_true",
                      help="print the summary as one JSON object (no progress)")
    demo.add_argument("--keep", action="store_true", help="keep the gateways' state directories")
    demo.set_defaults(handler=_demo)

    login = sub.add_parser(
        "login", help="log in to Globus (tokens kept in your home directory)",
        description="Log in to Globus Auth with your browser: open the printed URL, paste "
        "the code back. The client id is SCISTREAM_LOGIN_CLIENT_ID (default: the Globus "
        "Compute SDK's, whose token store, ~/.globus_compute/storage.db, then holds the "
        "tokens: one login for both). Headless runs use a GlobusCredentials block or "
        "SCISTREAM_GLOBUS_CLIENT_ID/_SECRET instead.",
    )
    login.add_argument("--force", action="store_true", help="log in even if tokens are valid")
    login.set_defaults(handler=_login)
    logout = sub.add_parser("logout", help="revoke and delete your Globus tokens",
                            description="Revoke the stored Globus tokens and delete them.")
    logout.set_defaults(handler=_logout)
    whoami = sub.add_parser("whoami", help="show the Globus identity in use",
                            description="Show the Globus identity the client runs as "
                            "(your login, or the confidential client from the environment).")
    whoami.add_argument("--json", action="store_true", help="print one JSON object")
    whoami.set_defaults(handler=_whoami)

    open_ = sub.add_parser(
        "open", help="open a stream between two gateways (the open-stream flow)",
        description="Open a stream: reserve on both gateways concurrently, the producer's "
        "hello, connect both. Runs the open-stream Prefect flow, so the run, its listeners "
        "table and summary show in the Prefect UI. The hello key is never printed.",
    )
    open_.add_argument("--producer", required=True, metavar="GATEWAY", help=GATEWAY_HELP)
    open_.add_argument("--consumer", required=True, metavar="GATEWAY", help=GATEWAY_HELP)
    open_.add_argument("--num-conn", type=_int_in(1, 64), default=4,
                       help="parallel connections (default 4)")
    open_.add_argument("--rate", type=_int_in(0, 10**9), default=0,
                       help="rate limit in kbit/s (default 0: unlimited)")
    open_.add_argument("--app-listener", action="append", metavar="HOST:PORT", type=_address,
                       help="where the producer app listens (repeat for several); the flow "
                       "sends the producer's hello")
    open_.add_argument("--uid", type=_uid, help="the stream's uid (default: a new UUID)")
    open_.add_argument("--hello-key-block", metavar="NAME",
                       help="a Prefect Secret block holding the hello key, for a producer "
                       "controller that sends its own hello (scistream hello)")
    open_.add_argument("--no-tls", dest="tls", action="store_false",
                       help="turn OFF encryption between the gateways (refused with "
                       "NOT_IMPLEMENTED unless both gateways' settings say "
                       "allow_plain_tcp = true)")
    open_.add_argument("--lease", type=_int_in(1, 10**7), metavar="SECONDS",
                       help="lease on both gateways (default: theirs)")
    open_.add_argument("--hello-timeout", type=_seconds, default=300.0, metavar="SECONDS",
                       help="how long to wait for the producer's hello (default 300)")
    open_.add_argument("--json", action="store_true", help="print the handle as one JSON object")
    open_.set_defaults(handler=_open)

    for name, handler, text in (
        ("status", _status, "state, proxy liveness and bytes of each end of a stream"),
        ("release", _release, "release a stream: proxies stopped, ports freed, keys deleted "
         "(idempotent)"),
    ):
        cmd = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ". "
                             "Calls the gateways directly (no flow run).")
        cmd.add_argument("uid", type=_uid, help="the stream's uid")
        cmd.add_argument("--gateway", action="append", required=True, metavar="GATEWAY",
                         help=GATEWAY_HELP + "; repeat for both ends")
        cmd.add_argument("--json", action="store_true", help="print one JSON object")
        cmd.set_defaults(handler=handler)

    hello = sub.add_parser(
        "hello", help="an app controller's hello: prove the key, give or learn listeners",
        description="Send an app controller's hello to its gateway. A producer (--role PROD) "
        "gives where its app listens and gets its gateway's listeners; a consumer "
        "(--role CONS) gets where its app connects. Prints one listener a line.",
    )
    hello.add_argument("--gateway", required=True, metavar="GATEWAY", help=GATEWAY_HELP)
    hello.add_argument("--uid", required=True, type=_uid, help="the stream's uid")
    hello.add_argument("--role", required=True, choices=["PROD", "CONS"])
    hello.add_argument("--app-listener", action="append", metavar="HOST:PORT", type=_address,
                       help="(producer) where the app listens; repeat for several")
    hello.add_argument("--json", action="store_true", help="print one JSON object")
    _add_key_source(hello)
    hello.set_defaults(handler=_hello)

    serve = sub.add_parser(
        "serve", help="serve the open-stream and release-stream flows as deployments",
        description="Serve the open-stream and release-stream flows as deployments named "
        "'scistream' of this Prefect server (PREFECT_API_URL), so they can be run from the "
        "Prefect UI or `prefect deployment run open-stream/scistream`. Runs until stopped.",
    )
    serve.add_argument("--limit", type=_int_in(1, 1000), default=None,
                       help="most flow runs at once (default: no limit)")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults()

    def command() -> int:
        if os.environ.get(DEBUG_ENV) != "1" and args.command in _USES_PREFECT:
            _console_without_tracebacks()
        return args.handler(args)

    # The verdict is the last line: nothing is logged after it (Prefect would log the
    # shutdown of its temporary server at exit).
    return run_coded(f"scistream {args.command}", command,
                     before_verdict=lambda: logging.disable(logging.CRITICAL))


if __name__ == "__main__":
    sys.exit(main())
