"""``scistream open / status / release / hello / whoami`` as a user runs them (subprocesses),
with a Prefect server configured (PREFECT_API_URL): ``open`` runs the open-stream flow
there. Without one: test_cli_direct.py."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid

import pytest

from conftest import run_consumer


def _env(tmp_path, **extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home))
    env.pop("SCISTREAM_HELLO_KEY", None)
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the harness's server
    return {**env, **extra}


def scistream(tmp_path, *args, stdin: str | None = None, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scistream_prefect.cli", *args],
                          capture_output=True, text=True, timeout=timeout, input=stdin,
                          env=env or _env(tmp_path))


@pytest.mark.slow
def test_open_status_release_by_settings_file(gateways, producer_app, tmp_path):
    producer, consumer = gateways
    app = producer_app(2, 16 << 20)
    prod, cons = str(producer.settings_path), str(consumer.settings_path)
    opened = scistream(tmp_path, "open", "--producer", prod, "--consumer", cons,
                       "--num-conn", "2", *sum((["--app-listener", a] for a in app.listeners),
                                               []), "--json")
    assert opened.returncode == 0, opened.stderr[-3000:]
    handle = json.loads(opened.stdout)
    assert "hello_key" not in handle and handle["tls"] is True
    assert handle["setup_round_trips"] == 2  # the producer's hello rode on its connect
    uid = handle["uid"]
    try:
        code, received = run_consumer(handle["listeners"])
        assert code == 0 and sum(r["bytes"] for r in received) == 16 << 20
        status = scistream(tmp_path, "status", uid, "--gateway", prod, "--gateway", cons,
                           "--json")
        assert status.returncode == 0, status.stderr[-2000:]
        ends = json.loads(status.stdout)["ends"]
        assert {e["state"] for e in ends.values()} == {"CONNECTED"}
        assert {e["role"] for e in ends.values()} == {"PROD", "CONS"}
        human = scistream(tmp_path, "status", uid, "--gateway", prod)
        assert human.returncode == 0 and "PROD CONNECTED, proxy alive" in human.stdout
    finally:
        released = scistream(tmp_path, "release", uid, "--gateway", prod, "--gateway", cons,
                             "--json")
    assert released.returncode == 0, released.stderr[-2000:]
    assert set(json.loads(released.stdout)["released"].values()) == {True}
    assert [gw.call("gateway_info", {})["active_streams"] for gw in gateways] == [0, 0]


@pytest.mark.slow
def test_controllers_say_hello_with_keys_that_never_touch_argv(gateways, producer_app, tmp_path):
    """open waits for the producer controller's hello; the consumer controller learns
    where to connect. Keys come from standard input and an owner-only file."""
    from prefect.blocks.system import Secret

    producer, consumer = gateways
    prod, cons = str(producer.settings_path), str(consumer.settings_path)
    app = producer_app(1, 4 << 20)
    key, uid = secrets.token_urlsafe(32), str(uuid.uuid4())
    Secret(value=key).save("cli-hello-key", overwrite=True)
    opener = subprocess.Popen(
        [sys.executable, "-m", "scistream_prefect.cli", "open", "--producer", prod,
         "--consumer", cons, "--num-conn", "1", "--uid", uid, "--hello-key-block",
         "cli-hello-key", "--hello-timeout", "120", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        # The producer's controller: retried until open has reserved the stream.
        for _ in range(240):
            hello = scistream(tmp_path, "hello", "--gateway", prod, "--uid", uid, "--role",
                              "PROD", "--app-listener", app.listeners[0], "--key-stdin",
                              "--json", stdin=key + "\n")
            if "INVALID_UID" not in hello.stderr:
                break
        assert hello.returncode == 0, hello.stderr[-2000:]
        out, err = opener.communicate(timeout=240)
    finally:
        if opener.poll() is None:
            opener.kill()
            opener.wait()
    assert opener.returncode == 0, err[-3000:]
    handle = json.loads(out)
    try:
        assert json.loads(hello.stdout)["listeners"] == handle["producer_listeners"]
        assert handle["setup_round_trips"] == 3  # reserve, wait_hello, connect
        key_file = tmp_path / "stream.key"
        key_file.write_text(key)
        key_file.chmod(0o600)
        learned = scistream(tmp_path, "hello", "--gateway", cons, "--uid", uid, "--role", "CONS",
                            "--key-file", str(key_file))
        assert learned.returncode == 0, learned.stderr[-2000:]
        assert learned.stdout.split() == handle["listeners"]
        code, received = run_consumer(learned.stdout.split())
        assert code == 0 and sum(r["bytes"] for r in received) == 4 << 20
        # The key was on no command line and in no output.
        assert all(key not in text for text in (out, err, hello.stdout, learned.stdout))

        # The same through the environment variable; a wrong key is AUTH_ERROR.
        env = _env(tmp_path, SCISTREAM_HELLO_KEY="not-the-key")
        wrong = scistream(tmp_path, "hello", "--gateway", cons, "--uid", uid, "--role", "CONS",
                          env=env)
        assert wrong.returncode == 2 and "AUTH_ERROR" in wrong.stderr
        assert "Traceback" not in wrong.stderr
        key_file.chmod(0o644)
        loose = scistream(tmp_path, "hello", "--gateway", cons, "--uid", uid, "--role", "CONS",
                          "--key-file", str(key_file))
        assert loose.returncode == 2 and "readable by others" in loose.stderr
    finally:
        scistream(tmp_path, "release", uid, "--gateway", prod, "--gateway", cons)


@pytest.mark.slow
@pytest.mark.parametrize("args, code_text", [
    (["status", str(uuid.uuid4()), "--gateway", "/nonexistent/gateway.toml"], "BAD_FORMAT"),
    (["status", str(uuid.uuid4()), "--gateway", "no-such-saved-block"], "BAD_FORMAT"),
    (["open", "--producer", "/nope.toml", "--consumer", "/nope.toml",
      "--app-listener", "127.0.0.1:1"], "BAD_FORMAT"),
    (["whoami"], "AUTH_ERROR"),
])
def test_errors_show_their_code_and_exit_2(tmp_path, args, code_text):
    proc = scistream(tmp_path, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    assert code_text in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_uid_is_invalid_uid(gateways, tmp_path):
    proc = scistream(tmp_path, "status", str(uuid.uuid4()), "--gateway",
                     str(gateways[0].settings_path))
    assert proc.returncode == 2 and "INVALID_UID" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_gateways_named_by_saved_blocks(gateways, producer_app, tmp_path):
    producer, consumer = gateways
    producer.save("cli-prod-gw", overwrite=True)
    consumer.save("cli-cons-gw", overwrite=True)
    app = producer_app(1, 1 << 20)
    opened = scistream(tmp_path, "open", "--producer", "cli-prod-gw", "--consumer",
                       "scistream-local-gateway/cli-cons-gw", "--num-conn", "1",
                       "--app-listener", app.listeners[0], "--json")
    assert opened.returncode == 0, opened.stderr[-3000:]
    handle = json.loads(opened.stdout)
    assert handle["producer"] == producer.label and handle["consumer"] == consumer.label
    released = scistream(tmp_path, "release", handle["uid"], "--gateway", "cli-prod-gw",
                         "--gateway", "cli-cons-gw")
    assert released.returncode == 0, released.stderr[-2000:]
    assert released.stdout.splitlines() == [f"{producer.label}: released",
                                            f"{consumer.label}: released"]
    assert [gw.call("gateway_info", {})["active_streams"] for gw in gateways] == [0, 0]


# Every option of every command, as its --help shows it. A secret (the hello key) is read
# from a file, stdin or a block, never from the command line, where `ps` shows it: a new
# option is added here only after that question is asked.
OPTIONS = {
    "demo": {"--bytes", "--json", "--keep", "--no-tls", "--num-conn", "--port-base"},
    "login": {"--force"},
    "logout": set(),
    "whoami": {"--json"},
    "open": {"--app-listener", "--consumer", "--hello-key-block", "--hello-timeout", "--json",
             "--lease", "--no-tls", "--num-conn", "--producer", "--rate", "--uid"},
    "status": {"--gateway", "--json"},
    "release": {"--gateway", "--json"},
    "renew": {"--gateway", "--json", "--lease"},
    "list": {"--gateway", "--json"},
    "watch": {"--gateway", "--interval", "--json"},
    "hello": {"--app-listener", "--gateway", "--json", "--key-file", "--key-stdin", "--role",
              "--uid"},
    "serve": {"--limit"},
}


def _help(*argv: str) -> str:
    import contextlib
    import io

    from scistream_prefect.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def test_no_command_takes_a_secret_on_the_command_line():
    import re

    commands = re.search(r"\{([a-z,-]+)\}", _help())[1].split(",")
    assert sorted(commands) == sorted(OPTIONS)
    for command, allowed in OPTIONS.items():
        shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help(command))) - {"--help"}
        assert shown == allowed, (command, shown ^ allowed)
