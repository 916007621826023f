"""Packaging: every extra the docs, the Makefile, the scripts and the error messages tell
people to install exists in pyproject.toml (pip only warns about an unknown extra, so a
missing one installs without what it should bring)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
