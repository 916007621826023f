"""Bad input to every command of ``scistream`` and ``scistream-gateway`` (hypothesis).

Each command gets a valid-looking command line broken in one way (an unknown option,
a bad value, a missing required option, an extra argument, a bad file). It must exit
2 with ``<program> <command>: <CODE>: <message>`` as the last line of standard error
(a SciStream code), show no traceback, and leave the gateway's state as it was (its
tables and files compared before and after). The commands run in this process for
speed (``main(argv)``); a few run as real subprocesses too, with the real exit code
and everything Prefect prints, and with ``SCISTREAM_DEBUG=1``.
``SCISTREAM_BAD_INPUT_EXAMPLES`` sets the examples per command (default 40).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scistream_gateway import cli as gateway_cli
from scistream_gateway.errors import ERROR_CODES
from scistream_prefect import cli as client_cli

from conftest import make_gateway
from badinputkit import APP, HYPOTHESIS, KEY, dump_state

pytestmark = pytest.mark.slow

VERDICT = re.compile(r"^scistream(-gateway)?( [a-z-]+)?: (?P<code>[A-Z_]+): \S")


class World:
    """A gateway with one stream in HELLO state, and the files commands read."""

    def __init__(self, root: Path):
        self.root = root
        self.gateway = make_gateway(root, "cli-bad-gw", size=8)
        self.settings_path = str(self.gateway.settings_path)
        self.state_dir = self.gateway.settings.state_dir
        self.uid = str(uuid.uuid4())
        self.gateway.call("reserve", {
            "uid": self.uid, "role": "PROD", "num_conn": 1, "lease_s": 3600,
            "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()})
        self.gateway.call("hello", {"uid": self.uid, "key": KEY, "role": "PROD",
                                    "app_listeners": [APP]})
        self.key_file = root / "hello.key"
        self.key_file.write_text(KEY)
        self.key_file.chmod(0o600)
        self.functions = root / "functions.json"
        self.functions.write_text(json.dumps({name: str(uuid.uuid4()) for name in (
            "gateway_info", "reserve", "hello", "wait_hello", "connect", "status", "renew",
            "release")}))
        self.scratch = root / "scratch"
        self.scratch.mkdir()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from scistream_proxy.leaks import proxy_pids

    root = tmp_path_factory.mktemp("cli-bad")
    w = World(root)
    yield w
    w.gateway.call("release", {"uid": w.uid})
    assert proxy_pids(under=root) == []


def run_in_process(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO("")  # --key-stdin reads an empty line
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.stdin = stdin
    return code, out.getvalue(), err.getvalue()


def assert_refused(code: int, err: str, argv: list[str]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err[-2000:])
    assert lines, (argv, "nothing on stderr")
    match = VERDICT.match(lines[-1])
    assert match and match["code"] in ERROR_CODES, (argv, lines[-1])
    assert "Traceback" not in err, (argv, err[-3000:])
    return match["code"]


# -- what a bad value can be ----------------------------------------------------------
def _not_int_in(low: int, high: int):
    def bad(text: str) -> bool:
        try:
            return not low <= int(text) <= high
        except ValueError:
            return True
    return st.text(max_size=12).filter(bad) | st.integers().filter(
        lambda n: not low <= n <= high).map(str)


def _not_uid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) != text
    except ValueError:
        return True


# Fixed values known to be bad (not picked by the validators under test, which would never
# generate what they wrongly accept).
BAD_ADDRESSES = st.sampled_from([
    "", "127.0.0.1", "127.0.0.1:", ":80", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1",
    "127.0.0.1:http", "127.0.0.1: 80", "::1:80", "[127.0.0.1]:80", "[::1]", "evil\nhost:80",
    "host name:80", "a:b:80", "h" * 300 + ":80"])
BAD_SIZES = st.sampled_from(["", " ", "abc", "GiB", "-1", "1e9", "1XB", "1.2.3MiB", "0x10",
                             "1 GiB GiB", "ten"])


def _not_seconds(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return True
    return not (value >= 0 and value != float("inf"))


text = st.text(max_size=16)
no_gateway = (st.text(max_size=16).filter(lambda t: not Path(t).expanduser().is_file())
              | st.sampled_from(["/nonexistent/gateway.toml", "no-such-block",
                                 "scistream-local-gateway/no-such", "a/b/c", "", "~",
                                 "./x.toml", "secret/x"]))
no_uid = text.filter(_not_uid) | st.uuids().map(lambda u: str(u).upper())


def client_commands(w: World) -> dict:
    """Per command: a base command line and the options that can be given bad values."""
    gw = w.settings_path
    return {
        "demo": (["demo", "--bytes", "1MiB"], {
            "--bytes": BAD_SIZES, "--num-conn": _not_int_in(1, 64),
            "--port-base": _not_int_in(1024, 65535 - 199)}, []),  # no option is required
        "login": (["login"], {}, []),
        "logout": (["logout"], {}, []),
        "whoami": (["whoami"], {}, []),
        "open": (["open", "--producer", gw, "--consumer", gw, "--app-listener", APP], {
            "--producer": no_gateway, "--consumer": no_gateway,
            "--num-conn": _not_int_in(1, 64), "--rate": _not_int_in(0, 10**9),
            "--app-listener": BAD_ADDRESSES, "--uid": no_uid,
            "--lease": _not_int_in(1, 10**7), "--hello-timeout": text.filter(_not_seconds)},
            ["--producer", "--consumer"]),
        "status": (["status", w.uid, "--gateway", gw], {"--gateway": no_gateway},
                   ["--gateway"]),
        "release": (["release", w.uid, "--gateway", gw], {"--gateway": no_gateway},
                    ["--gateway"]),
        "hello": (["hello", "--gateway", gw, "--uid", w.uid, "--role", "PROD",
                   "--app-listener", APP, "--key-file", str(w.key_file)], {
            "--gateway": no_gateway, "--uid": no_uid,
            "--role": text.filter(lambda r: r not in ("PROD", "CONS")),
            "--app-listener": BAD_ADDRESSES,
            "--key-file": st.sampled_from(["/nonexistent/key", "/etc/passwd", "/", "\0"])
                          | text.filter(lambda t: not Path(t).expanduser().exists())},
            ["--gateway", "--uid", "--role"]),
        # Base lines that would run (a demo, a server) are only ever broken further.
        "serve": (["serve", "--limit", "0"], {"--limit": _not_int_in(1, 1000)}, []),
    }


def gateway_commands(w: World) -> dict:
    return {
        "register": (["register"], {}, []),
        "render-config": (["render-config", "--functions", str(w.functions)], {
            "--functions": text.filter(lambda t: not Path(t).expanduser().is_file())
                           | st.just("/etc/passwd"),
            "--output-dir": st.sampled_from(["/dev/null/x", "/proc/x", "\0"])}, ["--functions"]),
        "info": (["info", "--settings", "/nonexistent/gateway.toml"], {
            "--settings": text.filter(lambda t: not Path(t).expanduser().is_file())
                          | st.just("/etc/passwd")}, []),
    }


@st.composite
def broken_command_line(draw, commands: dict, name: str) -> list[str]:
    """The command's base line, broken in one way that no correct parser accepts."""
    base, values, required = commands[name]
    argv = list(base)
    ways = ["unknown option", "extra argument"]
    if values:
        ways.append("bad value")
    if required:
        ways.append("missing option")
    way = draw(st.sampled_from(ways), label="how")
    if way == "unknown option":
        argv.insert(draw(st.integers(1, len(argv))), "--no-such-" + draw(
            st.from_regex(r"[a-z]{1,8}", fullmatch=True)))
    elif way == "extra argument":
        argv.append(draw(st.from_regex(r"[a-z0-9.:]{1,12}", fullmatch=True)))
    elif way == "bad value":
        option = draw(st.sampled_from(sorted(values)), label="option")
        value = draw(values[option], label="value")
        if option in argv:  # replace the base value
            del argv[argv.index(option): argv.index(option) + 2]
        argv.append(f"{option}={value}")
    else:
        option = draw(st.sampled_from(required), label="dropped")
        while option in argv:
            del argv[argv.index(option): argv.index(option) + 2]
    return argv


@pytest.mark.parametrize("name", ["demo", "login", "logout", "whoami", "open", "status",
                                  "release", "hello", "serve"])
def test_every_scistream_command_refuses_bad_input(world, name):
    commands = client_commands(world)

    @settings(parent=HYPOTHESIS)
    @given(argv=broken_command_line(commands, name))
    def check(argv):
        before = dump_state(world.state_dir)
        code, _, err = run_in_process(client_cli.main, argv)
        assert_refused(code, err, argv)
        assert dump_state(world.state_dir) == before, argv
        # A caller that goes on keeps its logging (the suite's run logs need it).
        assert logging.root.manager.disable == logging.NOTSET, argv

    check()


@pytest.mark.parametrize("name", ["register", "render-config", "info"])
def test_every_gateway_command_refuses_bad_input(world, name, monkeypatch):
    from scistream_gateway.settings import CONFIG_ENV

    monkeypatch.delenv(CONFIG_ENV, raising=False)
    commands = gateway_commands(world)

    @settings(parent=HYPOTHESIS)
    @given(argv=broken_command_line(commands, name))
    def check(argv):
        before = dump_state(world.state_dir)
        code, _, err = run_in_process(gateway_cli.main, argv)
        assert_refused(code, err, argv)
        assert dump_state(world.state_dir) == before, argv

    check()


@HYPOTHESIS
@given(content=st.text(max_size=200) | st.sampled_from([
    "[gateway]\nname = 'x'\n", "[gateway]\nname='x'\nstate_dir='/tmp/x'\nport_range=[1,2]\n",
    "[gateway]\nname='x'\nstate_dir='/tmp/x'\nbackend='telnet'\n", "[gateway]\nnope=1\n",
    "[gateway]\nname='x'\nstate_dir=5\n", "[gateway]\nname='x'\nstate_dir='/t'\nport_range=5\n",
]) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_info_refuses_a_broken_settings_file(world, content):
    path = world.scratch / "settings.toml"
    path.write_text(content, errors="surrogateescape")
    code, _, err = run_in_process(gateway_cli.main, ["info", "--settings", str(path)])
    assert assert_refused(code, err, ["info", content]) == "SERVER_ERR"  # as the gateway says


@HYPOTHESIS
@given(content=st.text(max_size=200) | st.sampled_from([
    "{}", "[]", '{"reserve": "not-a-uuid"}', "null",
]) | st.dictionaries(st.sampled_from(["reserve", "hello", "status", "bogus"]),
                     st.text(max_size=40)).map(json.dumps))
def test_render_config_refuses_a_broken_functions_file(world, content):
    path = world.scratch / "functions.json"
    path.write_text(content, errors="surrogateescape")
    code, _, err = run_in_process(gateway_cli.main, ["render-config", "--functions", str(path)])
    assert assert_refused(code, err, ["render-config", content]) == "BAD_FORMAT"


@HYPOTHESIS
@given(content=st.sampled_from(["", "\n", "  \n"]) | st.text(max_size=30).filter(
    lambda k: k.strip() != KEY))
def test_hello_with_a_wrong_or_empty_key_is_refused(world, content):
    path = world.scratch / "wrong.key"
    path.write_text(content, errors="surrogateescape")
    path.chmod(0o600)
    before = dump_state(world.state_dir)
    code, _, err = run_in_process(client_cli.main, [
        "hello", "--gateway", world.settings_path, "--uid", world.uid, "--role", "PROD",
        "--app-listener", APP, "--key-file", str(path)])
    assert assert_refused(code, err, ["hello", content]) in ("AUTH_ERROR", "BAD_FORMAT")
    assert dump_state(world.state_dir) == before


# -- as real processes ------------------------------------------------------------------
def _env(tmp_path, **extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, HOME=str(tmp_path), PREFECT_API_URL=PREFECT_API_URL.value())
    env.pop("SCISTREAM_DEBUG", None)
    return {**env, **extra}


def _run(program: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    module = {"scistream": "scistream_prefect.cli", "scistream-gateway": "scistream_gateway.cli"}
    return subprocess.run([sys.executable, "-m", module[program], *args], capture_output=True,
                          text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("program, args, code", [
    ("scistream", [], "BAD_FORMAT"),
    ("scistream", ["no-such-command"], "BAD_FORMAT"),
    ("scistream", ["open", "--producer", "x"], "BAD_FORMAT"),
    ("scistream", ["open", "--producer", "/no/gw.toml", "--consumer", "/no/gw.toml",
                   "--app-listener", "127.0.0.1:1"], "BAD_FORMAT"),
    ("scistream", ["status", "not-a-uid", "--gateway", "x"], "BAD_FORMAT"),
    ("scistream", ["demo", "--num-conn", "0"], "BAD_FORMAT"),
    ("scistream", ["login"], "AUTH_ERROR"),  # no terminal to paste a code into
    ("scistream-gateway", [], "BAD_FORMAT"),
    ("scistream-gateway", ["render-config", "--functions", "/etc/passwd"], "BAD_FORMAT"),
    ("scistream-gateway", ["info"], "BAD_FORMAT"),
    ("scistream-gateway", ["info", "--settings", "/etc/passwd"], "SERVER_ERR"),
])
def test_commands_as_processes_exit_2_with_the_coded_line_last(tmp_path, program, args, code):
    proc = _run(program, args, _env(tmp_path))
    assert assert_refused(proc.returncode, proc.stderr, args) == code


def test_a_flow_that_fails_inside_prints_no_prefect_traceback(world, tmp_path):
    """open's flow run fails at the gateway (the same gateway for both ends: the
    consumer's reserve of the uid is refused): Prefect logs the failed runs, without
    their tracebacks; the coded line comes last."""
    proc = _run("scistream", ["open", "--producer", world.settings_path, "--consumer",
                              world.settings_path, "--app-listener", APP], _env(tmp_path))
    # The consumer's reserve races the producer's on the same gateway: refused as a reuse
    # of the uid (BAD_FORMAT) once the producer's proxy runs, or as "a reserve of this
    # uid is in progress" (UNAVAILABLE) while it starts; both are coded refusals.
    assert assert_refused(proc.returncode, proc.stderr, ["open"]) in ("BAD_FORMAT",
                                                                      "UNAVAILABLE")
    assert "Finished in state Failed" in proc.stderr  # Prefect's own lines are still there
    assert world.gateway.call("gateway_info", {})["active_streams"] == 1  # the world's only


def test_an_unexpected_error_is_server_err_and_debug_shows_its_traceback(world, tmp_path):
    """No Prefect API to talk to: not a SciStream error, so SERVER_ERR, with a hint; with
    SCISTREAM_DEBUG=1 the traceback too, still followed by the coded line."""
    args = ["open", "--producer", world.settings_path, "--consumer", world.settings_path,
            "--app-listener", APP]
    env = _env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES="0")
    proc = _run("scistream", args, env)
    assert assert_refused(proc.returncode, proc.stderr, args) == "SERVER_ERR"
    assert "SCISTREAM_DEBUG=1" in proc.stderr.splitlines()[-1]
    debug = _run("scistream", args, {**env, "SCISTREAM_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert VERDICT.match(debug.stderr.splitlines()[-1])
