"""Imports: the client and the gateway's side never load the native relay, and every
module of the proxy package imports on its own (no cycle, no environment switch)."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import scistream_proxy

# The relay's own modules: what a gateway's relay process runs, nothing else needs.
RELAY = ["scistream_proxy.native", "scistream_proxy.streams", "scistream_proxy.engines",
         "scistream_proxy.pump", "scistream_proxy.frames"]


def _loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    env = {k: v for k, v in os.environ.items() if k != "SCISTREAM_PROXY_RELAY"}
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("module", [
    "scistream_proxy.backends", "scistream_gateway.protocol", "scistream_gateway.service",
    "scistream_prefect",
])
def test_the_client_and_the_gateway_do_not_import_the_relay(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert not loaded & set(RELAY), sorted(loaded & set(RELAY))


def test_looking_up_the_native_backend_does_not_import_the_relay():
    loaded = _loaded_after("from scistream_proxy.backends import get_backend\n"
                           "get_backend('native')")
    assert "scistream_proxy.native_backend" in loaded
    assert not loaded & set(RELAY), sorted(loaded & set(RELAY))


MODULES = sorted(m.name for m in pkgutil.iter_modules(scistream_proxy.__path__,
                                                      "scistream_proxy."))


@pytest.mark.parametrize("module", MODULES)
def test_every_proxy_module_imports_first_in_a_fresh_interpreter(module):
    assert module in _loaded_after(f"import {module}")


def test_every_backend_in_the_registry_loads():
    loaded = _loaded_after("from scistream_proxy.backends import BACKENDS\n"
                           "assert [BACKENDS[n].name for n in BACKENDS] == list(BACKENDS)")
    assert "scistream_proxy.docker_backends" in loaded


# A one-shot command imports only what it runs (issue 17: status p50 <= 0.4 s whole,
# measured by bench/cli.py): TLS is for reserve and connect, Prefect for other commands;
# --help needs neither the wire models nor the package's version (importlib.metadata,
# which pydantic imports anyway), nor the shipped endpoint configs.
NOT_FOR_STATUS = {"ssl", "scistream_proxy.tls", "scistream_proxy.external", "prefect"}
NOT_FOR_HELP = NOT_FOR_STATUS | {"pydantic", "importlib.metadata", "importlib.resources"}


def _command_loaded(tmp_path, *args: str) -> tuple[dict, set[str]]:
    """``scistream ARGS`` in a fresh interpreter: its JSON output and the modules it loaded."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_PROFILE", "XDG_STATE_HOME")}
    env.update(HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect-home"))
    code = ("import json, sys\nfrom scistream_prefect.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "sys.stdout.flush()\nprint(json.dumps(sorted(sys.modules)), file=sys.__stdout__)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env=env, timeout=120)
    *out, modules = proc.stdout.splitlines()
    assert not proc.stderr.strip(), proc.stderr[-2000:]
    return ("\n".join(out) if "--help" in args else json.loads("\n".join(out))), \
        set(json.loads(modules))


def test_help_and_status_load_only_what_they_run(gateways, tmp_path):
    help_text, loaded = _command_loaded(tmp_path, "--help")
    assert "status" in help_text
    assert not {m.split(".")[0] if m.startswith("prefect") else m for m in loaded} \
        & NOT_FOR_HELP, sorted(loaded & NOT_FOR_HELP)

    prod, cons = (str(gw.settings_path) for gw in gateways)
    handle, _ = _command_loaded(tmp_path, "open", "--producer", prod, "--consumer", cons,
                                "--num-conn", "1", "--app-listener", "127.0.0.1:9", "--json")
    both = ["--gateway", prod, "--gateway", cons]
    try:
        status, loaded = _command_loaded(tmp_path, "status", handle["uid"], *both, "--json")
        assert {end["state"] for end in status["ends"].values()} == {"CONNECTED"}
        assert {"scistream_gateway.service", "scistream_proxy.native_backend"} <= loaded
        top = {m for m in loaded if not m.startswith("prefect.")}
        assert not top & NOT_FOR_STATUS, sorted(top & NOT_FOR_STATUS)
    finally:
        released, _ = _command_loaded(tmp_path, "release", handle["uid"], *both, "--json")
    assert set(released["released"].values()) == {True}


def test_the_package_names_its_lazy_exports_for_type_checkers():
    """Every name ``scistream_prefect`` imports on first use is imported, from the same
    module, under ``TYPE_CHECKING`` too: else an editor or mypy sees it as ``Any``."""
    import ast

    import scistream_prefect

    tree = ast.parse(open(scistream_prefect.__file__).read())
    guarded = next(node for node in tree.body if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in guarded.body
            if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == scistream_prefect._HOMES
