"""What the container backends' tests share: why a test cannot reach the Docker engine's
host network from here, and the containers a test's gateways started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backend_chain import skip_reason as _backend_skip_reason


def _namespace_reason() -> str | None:
    """Why host-networked containers are out of this test's reach: the engine (a local
    dockerd) runs in another network namespace than this test (unshare --net)."""
    mine = os.readlink("/proc/self/ns/net")
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "dockerd" \
                    and os.readlink(proc / "ns" / "net") != mine:
                return ("container backends: the Docker engine's host network is another "
                        "network namespace than this test's")
        except OSError:
            continue
    return None


def needs(*names: str):
    reasons = [r for r in (_backend_skip_reason(n) for n in names if n != "native") if r]
    reasons += [r for r in (_namespace_reason(),) if r]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def skip_reason(name: str) -> str | None:
    """Why a backend cannot run here: what backend_chain says, and the namespace."""
    return _backend_skip_reason(name) or _namespace_reason()


def containers_of(root: Path) -> list:
    from scistream_proxy.docker_backends import LABEL, ProxyUnavailable, docker_client

    try:
        client = docker_client()
    except ProxyUnavailable:
        return []  # no engine: no container either
    try:
        return [c for c in client.containers.list(all=True, filters={"label": f"{LABEL}.managed=1"})
                if c.labels.get(f"{LABEL}.stream_dir", "").startswith(str(root))]
    finally:
        client.close()
