"""``scistream-gateway``: the gateway operator's command (register, render-config, info,
streams, release).

Runs on the gateway node, needs no Prefect::

    scistream-gateway register --output /etc/scistream/functions.json
    scistream-gateway render-config --functions /etc/scistream/functions.json \\
        --settings /etc/scistream/gateway.toml --output-dir /etc/scistream/endpoint
    scistream-gateway info --settings /etc/scistream/gateway.toml
    scistream-gateway streams --settings /etc/scistream/gateway.toml
    scistream-gateway release 0b5c4a1e-5f8a-4c1e-9d43-2f1f6ad2c7a1

``streams`` and ``release`` act on the gateway's state directly, as its operator (the
Unix user that owns the state directory): every client's streams, and a release that
needs no control secret.

``register`` uploads the shipped gateway functions to Globus Compute through the
Globus Compute SDK (interactive login, or a confidential client from
``GLOBUS_COMPUTE_CLIENT_ID`` / ``GLOBUS_COMPUTE_CLIENT_SECRET``) and writes a flat JSON
object, function name -> UUID, that ``render-config`` and the client's
``GlobusComputeGateway`` read. ``render-config`` writes the files that
``globus-compute-endpoint configure`` installs, and prints that command. Exit codes:
0 ok, 1 ``info --strict`` found warnings, 2 an error, whose last line on standard
error is ``scistream-gateway <command>: <CODE>: <message>`` with a SciStream code
(``BAD_FORMAT`` for a bad argument or file). No traceback is shown unless
``SCISTREAM_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["configure_command", "main", "read_function_ids", "register_functions",
           "render_config"]

_UUID_LINE = re.compile(
    r"^(?P<indent>\s*- )[0-9a-fA-F-]{36}(?P<comment>\s+#\s*(?P<name>[a-z_]+)\s*)$", re.M)


def _function_names() -> list[str]:
    from scistream_gateway.protocol import FUNCTIONS

    return list(FUNCTIONS)


def shipped_config(relative: str) -> str:
    """The text of a file shipped in ``endpoint_configs/``."""
    from importlib import resources  # 8 ms: not for every scistream command

    return resources.files("scistream_gateway.endpoint_configs").joinpath(relative).read_text()


def read_function_ids(path: Path) -> dict[str, str]:
    """A functions file as ``register`` writes it; ValueError says what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of function name -> UUID")
    missing = [n for n in _function_names() if n not in data]
    unknown = sorted(set(data) - set(_function_names()))
    if missing or unknown:
        raise ValueError(f"{path}: missing functions {missing}, unknown {unknown}")
    import uuid

    for name, value in data.items():
        try:
            if not isinstance(value, str) or str(uuid.UUID(value)) != value.lower():
                raise ValueError
        except ValueError:
            raise ValueError(f"{path}: {name} is not a UUID: {value!r}") from None
    return data


def register_functions(client, *, public: bool = False, group: str | None = None) -> dict:
    """Register every shipped function with ``client`` (a ``globus_compute_sdk.Client``);
    returns function name -> UUID."""
    from scistream_gateway.functions import ALL

    ids = {}
    for name, function in ALL.items():
        ids[name] = str(client.register_function(function, public=public, group=group))
    return ids


def make_client():
    """A Globus Compute client that serializes as the shipped endpoint configs allow."""
    from globus_compute_sdk import Client

    from scistream_gateway.local_worker import strategies

    return Client(**strategies(), do_version_check=False)


def fill_function_ids(text: str, ids: dict[str, str]) -> str:
    """Replace each ``- <uuid>  # name`` line of a shipped config by the registered UUID.

    Raises:
        ValueError: a function has no such line (the file was edited or is not ours).
    """
    seen = set()

    def put(match: re.Match) -> str:
        name = match["name"]
        if name not in ids:
            return match[0]
        seen.add(name)
        return f"{match['indent']}{ids[name]}{match['comment']}"

    out = _UUID_LINE.sub(put, text)
    if seen != set(ids):
        raise ValueError(f"the config lists no line for {sorted(set(ids) - seen)}")
    return out


def render_config(ids: dict[str, str], *, multi_user: bool = False,
                  display_name: str | None = None, settings: Path | None = None,
                  settings_dir: Path | None = None) -> dict[str, str]:
    """The files ``globus-compute-endpoint configure`` installs (file name -> text),
    UUIDs filled in: ``config.yaml`` (the endpoint's own, ``--core-config``),
    ``user_config_template.yaml.j2`` (the engine, ``--template-config``),
    ``user_config_schema.json`` (``--schema-config``), the systemd drop-in
    ``scistream.conf`` and, single-user, ``user_environment.yaml`` (``--user-env-config``,
    naming ``settings``). Multi-user, the template names ``settings_dir``.

    Raises:
        ValueError: a line this edits is missing from a shipped file.
    """
    kind = "multi_user" if multi_user else "single_user"
    files = {
        "config.yaml": fill_function_ids(shipped_config(f"{kind}/config.yaml"), ids),
        "user_config_template.yaml.j2": fill_function_ids(
            shipped_config(f"{kind}/user_config_template.yaml.j2"), ids),
        "user_config_schema.json": shipped_config("multi_user/user_config_schema.json"),
        "scistream.conf": shipped_config("systemd/scistream.conf"),
    }
    if multi_user:
        if settings_dir is not None:
            files["user_config_template.yaml.j2"] = _replace_line(
                files["user_config_template.yaml.j2"], "{%- set settings_dir = ",
                "{%- set settings_dir = " + json.dumps(str(settings_dir)) + " %}")
    else:
        environment = shipped_config("single_user/user_environment.yaml")
        if settings is not None:
            environment = _set_scalar(environment, "SCISTREAM_GATEWAY_CONFIG",
                                      Path(settings).resolve())
        files["user_environment.yaml"] = environment
    if display_name is not None:
        files["config.yaml"] = _set_scalar(files["config.yaml"], "display_name", display_name)
    return files


def configure_command(out: Path, *, name: str, multi_user: bool,
                      identity_mapping: Path | None = None) -> list[str]:
    """The ``globus-compute-endpoint configure`` line that installs ``out``'s files."""
    argv = ["globus-compute-endpoint", "configure", name,
            "--multi-user", "true" if multi_user else "false",
            "--core-config", str(out / "config.yaml"),
            "--template-config", str(out / "user_config_template.yaml.j2"),
            "--schema-config", str(out / "user_config_schema.json")]
    if multi_user:
        argv += ["--id-mapping-config",
                 str(identity_mapping or "/etc/scistream/identity_mapping.json"),
                 "--contact-email", "<operator's email>"]
    else:
        argv += ["--user-env-config", str(out / "user_environment.yaml")]
    return argv


def _set_scalar(text: str, key: str, value: object) -> str:
    """Set a top-level ``key: value`` line (value JSON-quoted: valid YAML, no injection)."""
    return _replace_line(text, f"{key}:", f"{key}: {json.dumps(str(value))}")


def _replace_line(text: str, start: str, line: str) -> str:
    """Replace the one line that begins with ``start``; ValueError if there is none."""
    pattern = re.compile(rf"^{re.escape(start)}.*$", re.M)
    if not pattern.search(text):
        raise ValueError(f"the shipped file has no line starting {start.strip()!r} "
                         "(edited, or from another version?)")
    return pattern.sub(lambda _: line, text, count=1)


# -- commands -------------------------------------------------------------------------
def _cmd_register(args: argparse.Namespace) -> int:
    from scistream_gateway.errors import BadFormat, Unavailable

    try:
        client = make_client()
        ids = register_functions(client, public=args.public, group=args.group)
    except Exception as exc:  # noqa: BLE001 - auth, network, service: say it plainly
        raise Unavailable(f"registering with Globus Compute failed: "
                          f"{type(exc).__name__}: {exc}") from None
    text = json.dumps(ids, indent=2) + "\n"
    if args.output:
        out = Path(args.output)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        except (OSError, ValueError) as exc:
            raise BadFormat(f"cannot write --output {out}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
        print(f"wrote {out}", file=sys.stderr)
    for name, fid in ids.items():
        print(f"{name:13} {fid}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    import shlex

    from scistream_gateway.errors import BadFormat

    try:
        ids = read_function_ids(args.functions)
        files = render_config(ids, multi_user=args.multi_user, display_name=args.display_name,
                              settings=args.settings, settings_dir=args.settings_dir)
    except ValueError as exc:
        raise BadFormat(str(exc)) from None
    if args.output_dir is None:
        sys.stdout.write(files["config.yaml"])
        return 0
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
            print(f"wrote {out / name}", file=sys.stderr)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise BadFormat(f"cannot write to --output-dir {out}: "
                        f"{getattr(exc, 'strerror', None) or exc}") from None
    command = configure_command(out.resolve(), name=args.endpoint_name,
                                multi_user=args.multi_user,
                                identity_mapping=args.identity_mapping)
    print("install them with:\n  " + shlex.join(command), file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from scistream_gateway.errors import BadFormat, Unavailable, error_from_wire
    from scistream_gateway.settings import CONFIG_ENV, GatewaySettings

    settings = args.settings or os.environ.get(CONFIG_ENV)
    if not settings:
        raise BadFormat(f"give --settings or set {CONFIG_ENV}")
    # A broken file is reported at once (SERVER_ERR naming the key, as the gateway
    # would), not after starting an engine.
    GatewaySettings.from_toml(Path(settings))
    try:
        from scistream_gateway.engine import engine_for
    except ImportError as exc:
        raise Unavailable(f"needs the gateway extra ({exc})") from None
    with engine_for(Path(settings), max_workers=1) as engine:
        reply = engine.call("gateway_info", {})
    if args.json:
        print(json.dumps(reply, indent=2))
    if "error" in reply:
        raise error_from_wire(reply)
    if not args.json:
        launch = reply["proxy_launch"]
        print(f"gateway {reply['name']} (scistream {reply['version']}), backend "
              f"{reply['backend']}")
        print(f"  addresses: LAN {reply['lan_address']}, WAN {reply['wan_address']}")
        print(f"  ports {reply['port_range'][0]}-{reply['port_range'][1]}: "
              f"{reply['free_ports']} free; {reply['active_streams']} active streams")
        print(f"  proxies launched: {launch['launch']}"
              + (f" ({launch['reason']})" if launch["reason"] else ""))
        for warning in reply["warnings"]:
            print(f"  WARNING: {warning}")
    return 1 if reply["warnings"] and args.strict else 0


def _operator_gateway(args: argparse.Namespace):
    """The gateway of ``--settings`` (or ``$SCISTREAM_GATEWAY_CONFIG``), opened here."""
    from scistream_gateway.errors import BadFormat
    from scistream_gateway.service import Gateway
    from scistream_gateway.settings import CONFIG_ENV, GatewaySettings

    settings = args.settings or os.environ.get(CONFIG_ENV)
    if not settings:
        raise BadFormat(f"give --settings or set {CONFIG_ENV}")
    return Gateway(GatewaySettings.from_toml(Path(settings)))


def _seconds(value: float) -> str:
    value = int(max(0, value))
    if value >= 86400:
        return f"{value // 86400}d{value % 86400 // 3600}h"
    if value >= 3600:
        return f"{value // 3600}h{value % 3600 // 60}m"
    if value >= 60:
        return f"{value // 60}m{value % 60}s"
    return f"{value}s"


def _cmd_streams(args: argparse.Namespace) -> int:
    import time

    from scistream_gateway.protocol import State

    with _operator_gateway(args) as gateway:
        streams = gateway.operator_streams(everything=args.all)
    if args.json:
        print(json.dumps([st.model_dump(mode="json") for st in streams], indent=2))
        return 0
    now = time.time()
    print(f"{'uid':36}  {'role':4}  {'state':9}  {'age':>6}  {'lease':>6}  bytes")
    for st in streams:
        lease = _seconds(st.lease_expires - now) if st.state in State.LIVE else "-"
        counters = ("-" if st.bytes is None
                    else " ".join(f"{k}={v}" for k, v in sorted(st.bytes.items())))
        print(f"{st.uid:36}  {st.role:4}  {st.state:9}  {_seconds(now - st.created):>6}  "
              f"{lease:>6}  {counters}")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    with _operator_gateway(args) as gateway:
        reply = gateway.operator_release(args.uid)
    print(json.dumps(reply))
    return 0


DEBUG_ENV = "SCISTREAM_DEBUG"


class CodedParser(argparse.ArgumentParser):
    """argparse whose errors end in a coded line: ``<prog>: BAD_FORMAT: <message>``
    (both command-line tools, ``scistream-gateway`` and ``scistream``)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        message = " ".join(message.splitlines())  # one line, whatever the argument held
        print(f"{self.prog}: BAD_FORMAT: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scistream-gateway``."""
    parser = CodedParser(
        prog="scistream-gateway",
        description="Set up a SciStream gateway's Globus Compute endpoint.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("register", help="register the gateway functions with Globus Compute",
                       description="Register the gateway functions with Globus Compute "
                       "and print their UUIDs (for allowed_functions).")
    p.add_argument("--output", type=Path, help="also write name -> UUID as JSON here")
    p.add_argument("--public", action="store_true", help="make the functions public")
    p.add_argument("--group", help="share the functions with this Globus group")
    p.set_defaults(run=_cmd_register)

    p = sub.add_parser("render-config", help="render the endpoint's config files",
                       description="Render the shipped endpoint config files for this "
                       "gateway, with the registered function UUIDs in allowed_functions, "
                       "and print the `globus-compute-endpoint configure` command that "
                       "installs them.")
    p.add_argument("--functions", type=Path, required=True,
                   help="JSON written by `scistream-gateway register --output`")
    p.add_argument("--multi-user", action="store_true",
                   help="a multi-user endpoint (run as root; one user endpoint per "
                   "mapped identity)")
    p.add_argument("--output-dir", type=Path,
                   help="write the files here (default: print config.yaml)")
    p.add_argument("--endpoint-name", default="scistream-gateway",
                   help="the endpoint's name in the printed configure command "
                   "(default: %(default)s)")
    p.add_argument("--display-name", help="the endpoint's display name")
    p.add_argument("--settings", type=Path,
                   help="single-user: the gateway TOML the workers read")
    p.add_argument("--settings-dir", type=Path,
                   help="multi-user: directory of per-user gateway TOML files (<user>.toml)")
    p.add_argument("--identity-mapping", type=Path,
                   help="multi-user: the identity mapping JSON file, for the printed "
                   "configure command")
    p.set_defaults(run=_cmd_render)

    p = sub.add_parser("info", help="run gateway_info through a local endpoint engine",
                       description="Run gateway_info as an endpoint worker would (the "
                       "endpoint's own ProcessPoolEngine and serializer) and print it.")
    p.add_argument("--settings", type=Path,
                   help="gateway TOML (default: $SCISTREAM_GATEWAY_CONFIG)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 if there are warnings")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("streams", help="list the gateway's streams (every client's)",
                       description="List the streams in the gateway's state directory, "
                       "every client's, newest first: uid, role, state, age, lease left, "
                       "bytes relayed. Run as the gateway's Unix user.")
    p.add_argument("--settings", type=Path,
                   help="gateway TOML (default: $SCISTREAM_GATEWAY_CONFIG)")
    p.add_argument("--all", action="store_true",
                   help="also the streams that ended (released, expired)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=_cmd_streams)

    p = sub.add_parser("release", help="release a stream as the operator",
                       description="Release stream UID (stop its proxy, free its ports, "
                       "delete its keys) without its control secret: the operator owns the "
                       "node. Releasing an unknown uid succeeds. Run as the gateway's Unix "
                       "user.")
    p.add_argument("uid", help="the stream's uid")
    p.add_argument("--settings", type=Path,
                   help="gateway TOML (default: $SCISTREAM_GATEWAY_CONFIG)")
    p.set_defaults(run=_cmd_release)
    return parser


def run_coded(name: str, command: Callable[[], int],
              before_verdict: Callable[[], None] | None = None) -> int:
    """Run a command-line tool's ``command``: its exit status, or 2 with one coded
    line last on stderr, ``<name>: <CODE>: <message>``. A SciStream error keeps its
    code; anything else is ``SERVER_ERR``. The traceback shows with SCISTREAM_DEBUG=1
    only. ``before_verdict`` runs just before that line (to silence late loggers)."""
    from scistream_gateway.errors import SciStreamError, ServerError

    debug = os.environ.get(DEBUG_ENV) == "1"
    try:
        return command()
    except SciStreamError as exc:  # expected failures: a message with its code
        error, trace = exc, traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - a bug or a broken host: still a coded line
        error = ServerError(f"unexpected {type(exc).__name__}: {exc}"
                            + ("" if debug else f" (run with {DEBUG_ENV}=1 for the traceback)"))
        trace = traceback.format_exc()
    if debug:
        print(trace, file=sys.stderr, end="")
    if before_verdict is not None:
        before_verdict()
    sys.stdout.flush()
    text = " ".join(str(error).splitlines())  # one line, whatever the message held
    print(f"{name}: {text}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_coded(f"scistream-gateway {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
