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
