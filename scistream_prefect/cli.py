"""The ``scistream`` command.

Exit codes: 0 success; 1 the demo found a checksum mismatch or a leak; 2 a bad argument
or an error. The last line on standard error is then ``scistream <command>: <CODE>:
<message>`` with a SciStream code: ``BAD_FORMAT`` for a bad argument, the gateway's code
for a gateway error, ``NOT_IMPLEMENTED`` for a command that needs Prefect where it is not
installed (a gateway node), ``SERVER_ERR`` for anything unexpected. No traceback is shown
unless ``SCISTREAM_DEBUG=1``.

Only ``demo``, ``serve``, ``login``/``logout``/``whoami``, gateways named by saved blocks,
and ``open`` with a Prefect server import Prefect; a gateway named by its settings file is
called in this process (:mod:`scistream_prefect.local_client`), so ``--help``, ``status``,
``renew``, ``list``, ``watch``, ``release`` and ``hello`` start fast and run on a gateway
node without Prefect.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

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


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


class _Bound:
    """The lower or upper bound of one of :mod:`scistream_prefect.streams_core`'s argument
    types (``NumConn``, ``LeaseS``, ...), the flows' parameter bounds, read when a help
    text shows it: so the help says what the flows check, and only ``open`` imports the
    wire models (pydantic) that hold them."""

    def __init__(self, kind: str, side: str):
        self.kind, self.side = kind, side  # side: "ge" or "le"

    def value(self) -> float:
        from scistream_prefect import streams_core as core

        for field in getattr(core, self.kind).__metadata__:
            for rule in getattr(field, "metadata", ()):
                if hasattr(rule, self.side):
                    return getattr(rule, self.side)
        raise LookupError(f"{self.kind} has no {self.side} bound")

    def __str__(self) -> str:
        value = self.value()
        return f"{value:g}" if isinstance(value, float) else str(value)


def _bounded(kind: str, parse):
    """An argument type: ``parse(text)``, then held to the bounds of ``kind``."""
    low, high = _Bound(kind, "ge"), _Bound(kind, "le")

    def check(text: str):
        value = parse(text)
        if not low.value() <= value <= high.value():
            raise argparse.ArgumentTypeError(f"{text!r} is not in [{low}, {high}]")
        return value
    return check


def _bounds_shown(action: argparse.Action, kind: str) -> None:
    """Let ``action``'s help say ``%(low)s`` and ``%(high)s``: ``kind``'s bounds (argparse
    fills a help text from the action's attributes)."""
    action.low, action.high = _Bound(kind, "ge"), _Bound(kind, "le")


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
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


CLIENT_EXTRA = "pip install 'scistream-prefect[client]'"
RECORD_NAME = "streams.jsonl"


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
    (its API handler still sends them to the Prefect UI), unless SCISTREAM_DEBUG=1."""
    if os.environ.get(DEBUG_ENV) == "1":
        return
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

    _console_without_tracebacks()
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
              f"  setup (reserve ‖ reserve, connect ‖ connect): {summary['setup_s']:.3f} s\n"
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


def prefect_api_url() -> str | None:
    """The Prefect server the user named: ``PREFECT_API_URL`` in the environment, else in
    the active Prefect profile (read as Prefect does, without importing it)."""
    import tomllib

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return (profiles.get("profiles", {}).get(name) or {}).get("PREFECT_API_URL") or None


def record_path() -> Path:
    """Where the commands that change a stream keep their record (one JSON line each)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "scistream" / RECORD_NAME


def _record(entry: dict) -> None:
    """Append one line to the user's record: owner-only, and never a secret (no hello key,
    no certificate; listeners, fingerprints and outcomes only)."""
    path = record_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also a file made earlier with looser permissions
        os.write(fd, (json.dumps({"time": time.time(), **entry}) + "\n").encode())
    finally:
        os.close(fd)


def _recorded(command: str, **fields):
    """A context that records ``command``'s outcome: fields, plus the error if it failed."""
    import contextlib

    @contextlib.contextmanager
    def recording():
        try:
            yield fields
        except Exception as exc:
            _record({"command": command, **fields, "outcome": "FAILED",
                     "error": f"{getattr(exc, 'code', 'SERVER_ERR')}: "
                              f"{getattr(exc, 'message', None) or exc}"[:500]})
            raise
        _record({"command": command, **fields, "outcome": "OK"})
    return recording()


def _open(args: argparse.Namespace) -> int:
    from scistream_gateway.errors import BadFormat

    if not args.app_listener and not (args.uid and args.hello_key_block):
        raise BadFormat("give --app-listener (the producer's connect carries its hello), or "
                        "--uid and --hello-key-block for a producer controller's own hello")
    options = dict(num_conn=args.num_conn, rate=args.rate, app_listeners=args.app_listener or None,
                   uid=args.uid, tls=args.tls, lease_s=args.lease,
                   hello_timeout_s=args.hello_timeout)
    if prefect_api_url():
        from scistream_prefect.flows.streams import open_stream

        _console_without_tracebacks()
        handle = open_stream(_block(args.producer), _block(args.consumer),
                             hello_key_block=args.hello_key_block, **options)
    else:
        handle = _open_direct(args, options)
    data = handle.model_dump(mode="json")
    _print(args, data,
           f"stream {handle.uid} open ({handle.producer} -> {handle.consumer}, "
           f"{'TLS' if handle.tls else 'NO encryption'}, setup {handle.setup_s:.3f} s in "
           f"{handle.setup_round_trips} round trips)\n"
           f"consumer app connects to: {' '.join(handle.listeners)}")
    return 0


def _open_direct(args: argparse.Namespace, options: dict):
    """``open`` without a Prefect server: the open-stream flow's logic as plain calls,
    recorded in the user's state directory."""
    from scistream_prefect import streams_core as core

    producer, consumer = _gateway(args.producer), _gateway(args.consumer)
    hello_key = None
    if args.hello_key_block is not None:
        from prefect.blocks.system import Secret

        hello_key = Secret.load(args.hello_key_block).get()
    uid, key = core.key_and_uid(options.pop("uid"), hello_key, options["app_listeners"])
    core.check_setup(producer, consumer, options["num_conn"], options["rate"],
                     options["app_listeners"], options["tls"], options["lease_s"],
                     options["hello_timeout_s"])
    with _recorded("open", uid=uid, producer=producer.label, consumer=consumer.label,
                   num_conn=options["num_conn"], tls=options["tls"]) as fields:
        handle = core.open_ends(producer, consumer, uid=uid, hello_key=key, **options)
        fields.update(listeners=handle.listeners, producer_listeners=handle.producer_listeners,
                      app_listeners=handle.app_listeners,
                      producer_fingerprint=handle.producer_fingerprint,
                      consumer_fingerprint=handle.consumer_fingerprint,
                      setup_s=round(handle.setup_s, 4),
                      setup_round_trips=handle.setup_round_trips,
                      lease_expires=handle.lease_expires)
    return handle


def _block(spec: str):
    """A gateway as a Prefect block (a flow's parameter): a settings file's becomes a
    LocalGateway block."""
    from scistream_prefect.local_client import LocalClient

    gateway = _gateway(spec)
    if isinstance(gateway, LocalClient):
        from scistream_prefect.gateways import LocalGateway

        return LocalGateway(settings_path=gateway.settings_path)
    return gateway


def _each_gateway(args: argparse.Namespace, call, gateways: list | None = None
                  ) -> list[tuple[str, object]]:
    """``call(gateway)`` on every ``--gateway`` (or ``gateways``) at once: (label, result)
    in their order."""
    from concurrent.futures import ThreadPoolExecutor

    if gateways is None:
        gateways = [_gateway(spec) for spec in args.gateway]
    with ThreadPoolExecutor(len(gateways)) as pool:
        futures = [pool.submit(call, gw) for gw in gateways]
        return [(gw.label, f.result()) for gw, f in zip(gateways, futures, strict=True)]


def _moved(moved: object) -> int | None:
    """Bytes a stream end moved, both directions, from its ``bytes`` field (None: its
    proxy counts none)."""
    if isinstance(moved, dict):
        return int(moved.get("from_app", 0)) + int(moved.get("to_app", 0))
    return moved if isinstance(moved, int) else None


def _status(args: argparse.Namespace) -> int:
    from scistream_prefect import streams_core as core

    ends = _each_gateway(args, lambda gw: core.status(gw, args.uid))
    lines = []
    for label, s in ends:
        lines.append(f"{label}: {s.role} {s.state}, proxy {'alive' if s.alive else 'down'}"
                     f", {_moved(s.bytes) or 0} bytes, listeners {' '.join(s.listeners)}")
    _print(args, {"uid": args.uid, "ends": {label: s.wire() for label, s in ends}},
           "\n".join(lines))
    return 0


def _renew(args: argparse.Namespace) -> int:
    from scistream_prefect import streams_core as core

    with _recorded("renew", uid=args.uid, gateways=args.gateway, lease_s=args.lease) as fields:
        ends = _each_gateway(args, lambda gw: core.renew(gw, args.uid, args.lease))
        fields.update(lease_expires={label: expires for label, expires in ends})
    now = time.time()
    _print(args, {"uid": args.uid, "lease_expires": {label: t for label, t in ends}},
           "\n".join(f"{label}: lease until {_when(t)} ({t - now:.0f} s from now)"
                     for label, t in ends))
    return 0


def _release(args: argparse.Namespace) -> int:
    from scistream_prefect import streams_core as core

    with _recorded("release", uid=args.uid, gateways=args.gateway):
        ends = _each_gateway(args, lambda gw: core.release(gw, args.uid))
    _print(args, {"uid": args.uid, "released": {label: r for label, r in ends}},
           "\n".join(f"{label}: released" for label, _ in ends))
    return 0


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


def _span(seconds: float) -> str:
    """``42s``, ``7m03s``, ``2h05m``, ``3d04h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _list(args: argparse.Namespace) -> int:
    from scistream_prefect import streams_core as core

    ends = _each_gateway(args, core.list_streams)
    now = time.time()
    rows = [{"gateway": label, **stream} for label, streams in ends for stream in streams]
    lines = [f"{'UID':36}  {'GATEWAY':20}  {'ROLE':4}  {'STATE':9}  {'AGE':>7}  "
             f"{'LEASE LEFT':>10}  {'BYTES':>10}"]
    for row in rows:
        lines.append(f"{row['uid']:36}  {row['gateway'][:20]:20}  {row['role']:4}  "
                     f"{row['state']:9}  {_span(now - row['created']):>7}  "
                     f"{_span(row['lease_expires'] - now):>10}  {_size(_moved(row['bytes'])):>10}")
    _print(args, {"streams": rows}, "\n".join(lines) if rows else "no streams")
    return 0


def _rate(count: float) -> str:
    return f"{count * 8 / 1e9:.2f} Gbit/s" if count >= 1e8 else f"{count * 8 / 1e6:.1f} Mbit/s"


def _watch(args: argparse.Namespace) -> int:
    from scistream_gateway.errors import ConnError
    from scistream_gateway.protocol import State
    from scistream_prefect import streams_core as core

    gateways = [_gateway(spec) for spec in args.gateway]
    tty = sys.stdout.isatty() and not args.json
    before: dict[str, tuple[float, int]] = {}
    try:
        while True:
            polled = time.monotonic()
            ends = _each_gateway(args, lambda gw: core.status(gw, args.uid), gateways)
            report = {}
            for label, s in ends:
                moved = _moved(s.bytes)
                last = before.get(label)
                rate = (None if moved is None or last is None or polled <= last[0]
                        else max(0.0, (moved - last[1]) / (polled - last[0])))
                if moved is not None:
                    before[label] = (polled, moved)
                report[label] = {"state": s.state, "alive": s.alive, "bytes": moved,
                                 "bytes_per_s": rate}
            if args.json:
                print(json.dumps({"time": time.time(), "uid": args.uid, "ends": report}),
                      flush=True)
            else:
                line = " | ".join(
                    f"{label}: {e['state']} {_size(e['bytes'])}"
                    + ("" if e["bytes_per_s"] is None else f" {_rate(e['bytes_per_s'])}")
                    for label, e in report.items())
                print(("\r\033[K" + line) if tty else line, end="" if tty else "\n", flush=True)
            states = {e["state"] for e in report.values()}
            if State.FAILED in states:
                if tty:
                    print()
                raise ConnError(f"stream {args.uid} FAILED: "
                                + "; ".join(s.last_error or s.detail or label
                                            for label, s in ends if s.state == State.FAILED))
            if not states & State.ACTIVE:
                if tty:
                    print()
                return 0
            time.sleep(max(0.0, args.interval - (time.monotonic() - polled)))
    except KeyboardInterrupt:  # the user stops watching; the stream goes on
        if tty:
            print()
        return 0


def _serve(args: argparse.Namespace) -> int:
    from scistream_prefect.deployments import serve

    _console_without_tracebacks()
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
        "open", help="open a stream between two gateways",
        description="Open a stream: reserve on both gateways concurrently, then connect "
        "both, the producer's connect carrying its hello (--app-listener; two round trips) "
        "or after waiting for the producer's controller; on any failure both ends are "
        "released. Where a Prefect "
        "server is configured (PREFECT_API_URL, in the environment or the active Prefect "
        "profile), this runs the open-stream flow there, so the run, its listeners table "
        "and summary show in the Prefect UI. Without one, the same steps run directly (no "
        "temporary Prefect server) and the outcome is appended as one JSON line to "
        "$XDG_STATE_HOME/scistream/streams.jsonl (default ~/.local/state/scistream/, mode "
        "0600: uid, gateways, listeners, fingerprints, timings, never a key); renew and "
        "release append theirs there too. The hello key is never printed.",
    )
    open_.add_argument("--producer", required=True, metavar="GATEWAY", help=GATEWAY_HELP)
    open_.add_argument("--consumer", required=True, metavar="GATEWAY", help=GATEWAY_HELP)
    _bounds_shown(open_.add_argument(
        "--num-conn", type=_bounded("NumConn", _int), default=4,
        help="parallel connections, %(low)s to %(high)s; the gateways' max_num_conn bounds "
        "it further (default 4)"), "NumConn")
    _bounds_shown(open_.add_argument(
        "--rate", type=_bounded("Rate", _int), default=0,
        help="rate limit in kbit/s, %(low)s to %(high)s (default 0: unlimited)"), "Rate")
    open_.add_argument("--app-listener", action="append", metavar="HOST:PORT", type=_address,
                       help="where the producer app listens (repeat for several); the "
                       "producer's connect carries its hello")
    open_.add_argument("--uid", type=_uid, help="the stream's uid (default: a new UUID)")
    open_.add_argument("--hello-key-block", metavar="NAME",
                       help="a Prefect Secret block holding the hello key, for a producer "
                       "controller that sends its own hello (scistream hello); needs Prefect")
    open_.add_argument("--no-tls", dest="tls", action="store_false",
                       help="turn OFF encryption between the gateways (refused with "
                       "NOT_IMPLEMENTED unless both gateways' settings say "
                       "allow_plain_tcp = true)")
    _bounds_shown(open_.add_argument(
        "--lease", type=_bounded("LeaseS", _int), metavar="SECONDS",
        help="lease on both gateways, %(low)s to %(high)s s; each gateway's max_lease_s "
        "bounds it further (default: theirs)"), "LeaseS")
    _bounds_shown(open_.add_argument(
        "--hello-timeout", type=_bounded("WaitS", _number), default=300.0, metavar="SECONDS",
        help="how long to wait for the producer's hello, %(low)s to %(high)s s (default "
        "300)"), "WaitS")
    open_.add_argument("--json", action="store_true", help="print the handle as one JSON object")
    open_.set_defaults(handler=_open)

    for name, handler, text in (
        ("status", _status, "state, proxy liveness and bytes of each end of a stream"),
        ("release", _release, "release a stream: proxies stopped, ports freed, keys deleted "
         "(idempotent; recorded in your streams.jsonl)"),
        ("renew", _renew, "extend a stream's lease on each end (recorded in your "
         "streams.jsonl)"),
        ("watch", _watch, "live throughput of each end until the stream ends (Ctrl-C stops "
         "watching, not the stream)"),
    ):
        cmd = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ". "
                             "Calls the gateways directly (no flow run).")
        cmd.add_argument("uid", type=_uid, help="the stream's uid")
        cmd.add_argument("--gateway", action="append", required=True, metavar="GATEWAY",
                         help=GATEWAY_HELP + "; repeat for both ends")
        if name == "renew":
            _bounds_shown(cmd.add_argument(
                "--lease", type=_bounded("LeaseS", _int), metavar="SECONDS",
                help="the new lease from now, %(low)s to %(high)s s; each gateway's "
                "max_lease_s bounds it further (default: each gateway's)"), "LeaseS")
        if name == "watch":
            cmd.add_argument("--interval", type=_positive_seconds, default=1.0,
                             metavar="SECONDS", help="seconds between two looks (default 1)")
            cmd.description += (" Shows one updating line on a terminal, a line per look "
                                "otherwise. Exits 0 once no end is active (released or "
                                "expired), or on Ctrl-C; 2 with CONN_ERROR if an end FAILED.")
            cmd.add_argument("--json", action="store_true",
                             help="print one JSON object per look: state, bytes and bytes/s "
                             "of each end")
        else:
            cmd.add_argument("--json", action="store_true", help="print one JSON object")
        cmd.set_defaults(handler=handler)

    list_ = sub.add_parser(
        "list", help="your streams on gateways: state, age, lease left, bytes",
        description="List your streams on each gateway (the gateway's list_streams: the "
        "streams whose ownership proofs your requests carry), with state, age, lease left "
        "and bytes moved.",
    )
    list_.add_argument("--gateway", action="append", required=True, metavar="GATEWAY",
                       help=GATEWAY_HELP + "; repeat for several")
    list_.add_argument("--json", action="store_true", help="print one JSON object")
    list_.set_defaults(handler=_list)

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


def _needs_client_extra(exc: ModuleNotFoundError) -> bool:
    return (exc.name or "").split(".")[0] in {"prefect", "globus_compute_sdk", "globus_sdk"}


def entry() -> None:
    """The ``scistream`` command: :func:`main`, exiting with its code."""
    code = main(exiting=True)
    compute = sys.modules.get("scistream_prefect.compute")
    if compute is not None and compute.calls_given_up():
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """End the process after its own cleanup, without the Compute SDK's exit, which
    waits for the result of every task submitted: a call given up on (its endpoint
    offline, a timeout) has none until the endpoint is back, and the command would
    hang after printing its answer."""
    recovery = sys.modules.get("scistream_prefect.recovery")
    if recovery is not None:
        recovery.forgotten(timeout_s=30)  # the Prefect writes made in the background
    logging.shutdown()  # flushes every handler, Prefect's API log handler included
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Run one command; its exit code. ``exiting``: the process ends right after, so
    logging is switched off before the verdict line (Prefect would log the shutdown of
    its temporary server after it). A caller that goes on keeps its logging."""
    # The command uses no pydantic plugin, and looking for one reads the entry points of
    # every installed distribution: 50 ms of a 0.4 s status here (bench/cli.py). Set before
    # the first model is built (parsing a uid imports the wire models).
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    args = build_parser().parse_args(argv)
    _prefect_defaults()
    # A gateway function's unexpected failure is logged, with its traceback, in the
    # gateway's own log; here it is the coded line (SCISTREAM_DEBUG=1 shows the traceback).
    logging.getLogger("scistream_gateway").addHandler(logging.NullHandler())

    def command() -> int:
        from scistream_gateway.errors import NotImplementedHere

        try:
            return args.handler(args)
        except ModuleNotFoundError as exc:
            if not _needs_client_extra(exc):
                raise
            raise NotImplementedHere(
                f"this needs the client's packages ({exc.name} is not installed here, as "
                f"on a gateway node): {CLIENT_EXTRA}") from None

    return run_coded(f"scistream {args.command}", command,
                     before_verdict=(lambda: logging.disable(logging.CRITICAL)) if exiting
                     else None)


if __name__ == "__main__":
    entry()
