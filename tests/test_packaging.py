"""Packaging: every extra the docs, the Makefile, the scripts and the error messages tell
people to install exists in pyproject.toml (pip only warns about an unknown extra, so a
missing one installs without what it should bring); and, slow, each extra installed
from one wheel built from the checkout into a fresh venv (not editable, no checkout on
the path) runs its commands and answers usefully. pip resolves the dependencies from
its configured indexes (PyPI: run these outside a network namespace without a route)
and reuses its cache."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# `scistream-prefect[a,b]`, also as a path (`/path/to/scistream-prefect[gateway]`), and an
# editable checkout: `-e '.[client,dev]'`.
EXTRAS = re.compile(r"(?:scistream-prefect|(?<![\w.])\.)\[([A-Za-z0-9_,. -]+)\]")


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "proxy").glob("*.py"))]
    for directory in ("scripts", ".ci"):
        files += sorted(p for p in (ROOT / directory).rglob("*") if p.is_file())
    return files


def named_extras(text: str) -> set[str]:
    return {extra.strip() for group in EXTRAS.findall(text) for extra in group.split(",")}


def test_the_scan_finds_both_forms():
    assert named_extras("pip install 'scistream-prefect[gateway,docker]'") == {
        "gateway", "docker"}
    assert named_extras("pip install -e '.[client, dev]'") == {"client", "dev"}
    assert named_extras("x = a[0]; y = b.c[1]; pip install '/p/scistream-prefect[gateway]'") \
        == {"gateway"}


def test_every_extra_named_in_docs_makefile_and_messages_exists():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                   ["optional-dependencies"])
    named = {}
    for path in _files():
        for extra in named_extras(path.read_text(errors="replace")):
            named.setdefault(extra, []).append(str(path.relative_to(ROOT)))
    # The Makefile installs the test set-up's extras: the scan must see at least those.
    assert {"client", "gateway", "docker", "dev"} <= set(named), named
    missing = {extra: where for extra, where in named.items() if extra not in declared}
    assert not missing, f"extras named but not in pyproject.toml: {missing}"


def test_the_docker_extra_brings_the_docker_sdk():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(re.match(r"docker\s*>=\s*7", req) for req in extras["docker"]), extras["docker"]


def test_the_client_extra_declares_globus_sdk():
    """scistream_prefect.auth imports globus_sdk: declared, not only pulled in by Compute."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(re.match(r"globus-sdk\s*>=\s*4", req) for req in extras["client"]), \
        extras["client"]


def _run(argv: list, *, cwd: Path, check: bool = True, timeout: float = 900,
         guarded: bool = True):
    """Run ``argv`` with no part of the checkout on PYTHONPATH; ``guarded``: with the
    tests' network guard (loopback only), which pip, fetching from its index, runs without."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("SCISTREAM_GATEWAY_CONFIG", None)
    if guarded:  # tests/ holds the guard's module, and no package of the project
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "netguard_site"),
                                             str(ROOT / "tests")])
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, (argv, done.stdout[-3000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once (from a copy, so the checkout gets no build/)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", "bench_results*"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", root / "dist", source],
         cwd=root, guarded=False)
    (built,) = (root / "dist").glob("scistream_prefect-*.whl")
    return built


def _venv(where: Path, wheel: Path, extra: str) -> Path:
    """A fresh venv with ``<wheel>[extra]`` installed; returns its bin directory."""
    _run([sys.executable, "-m", "venv", where], cwd=where.parent)
    bin_dir = where / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "--quiet", f"{wheel}[{extra}]"],
         cwd=where.parent, guarded=False)
    return bin_dir


@pytest.mark.slow
def test_the_wheel_ships_types_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "scistream_prefect/py.typed" in names
    for shipped in ("single_user/config.yaml", "single_user/user_config_template.yaml.j2",
                    "single_user/user_environment.yaml", "multi_user/config.yaml",
                    "multi_user/user_config_schema.json", "systemd/scistream.conf"):
        assert f"scistream_gateway/endpoint_configs/{shipped}" in names
    assert not [n for n in names if n.startswith("tests/")]


@pytest.mark.slow
def test_client_extra(wheel, tmp_path):
    bin_dir = _venv(tmp_path / "venv", wheel, "client")
    done = _run([bin_dir / "scistream", "--help"], cwd=tmp_path)
    assert done.stdout.startswith("usage: scistream")
    for command in ("open", "release", "status", "login"):
        assert command in done.stdout
    # globus-sdk is there in its own right, and the blocks carry what the UI shows.
    done = _run([bin_dir / "python", "-c",
                 "import globus_sdk, scistream_prefect as s; "
                 "print(globus_sdk.__version__); "
                 "print(s.GlobusComputeGateway._to_block_type().logo_url)"], cwd=tmp_path)
    version, logo = done.stdout.split()
    assert int(version.split(".")[0]) == 4
    assert logo.startswith("https://")


def _settings(where: Path) -> Path:
    path = where / "gateway.toml"
    path.write_text(f'''[gateway]
name = "packaged-gw"
state_dir = "{where / 'state'}"
lan_address = "127.0.0.1"
wan_address = "127.0.0.1"
port_range = [29500, 29539]
''')
    return path


@pytest.mark.slow
def test_gateway_extra(wheel, tmp_path):
    bin_dir = _venv(tmp_path / "venv", wheel, "gateway")
    done = _run([bin_dir / "scistream-gateway", "--help"], cwd=tmp_path)
    assert "register" in done.stdout and "render-config" in done.stdout
    done = _run([bin_dir / "scistream-gateway", "info", "--settings", _settings(tmp_path)],
                cwd=tmp_path)
    assert done.stdout.startswith("gateway packaged-gw (scistream ")
    assert re.search(r"ports 29500-29539: \d+ free; 0 active streams", done.stdout), done.stdout
    assert _run([bin_dir / "globus-compute-endpoint", "version"], cwd=tmp_path, check=False) \
        .returncode == 0
    # Prefect stays off gateway nodes.
    assert _run([bin_dir / "python", "-c", "import prefect"], cwd=tmp_path,
                check=False).returncode != 0
    # The client's command answers what needs no Prefect; a command that does says which
    # extra it needs, in one coded line, not a traceback.
    done = _run([bin_dir / "scistream", "--help"], cwd=tmp_path)
    assert "open" in done.stdout and "status" in done.stdout
    done = _run([bin_dir / "scistream", "serve"], cwd=tmp_path, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "NOT_IMPLEMENTED" in lines[0] and "[client]" in lines[0], \
        done.stderr


@pytest.mark.slow
def test_docker_extra(wheel, tmp_path):
    bin_dir = _venv(tmp_path / "venv", wheel, "docker")
    done = _run([bin_dir / "python", "-c",
                 "import docker, scistream_proxy.docker_backends as d; print(d.__name__)"],
                cwd=tmp_path)
    assert done.stdout.strip() == "scistream_proxy.docker_backends"
