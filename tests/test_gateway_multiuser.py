"""A multi-user gateway: functions run as two different local users (as a multi-user
endpoint runs each identity's functions as its mapped user), each with its own settings
and state directory, both given the same port range. The kernel arbitrates ports, so
their streams never share one; neither can read the other's state or keys, nor stop
the other's proxy."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from scistream_gateway.settings import GatewaySettings
from scistream_prefect.ownership import with_proofs
from scistream_proxy.leaks import port_is_free, proxy_pids

pytestmark = pytest.mark.root

USERS = ("scistream-test-a", "scistream-test-b")
PORTS = (30300, 30311)  # both users get the same 12 ports

# Runs gateway functions through the endpoint engine as the calling (mapped) user.
RUNNER = """
import json, sys
from scistream_gateway.engine import engine_for
calls = json.loads(sys.argv[1])
with engine_for(sys.argv[2], max_workers=1) as engine:
    print(json.dumps([engine.call(name, request) for name, request in calls]))
"""
READER = """
import sys
for path in sys.argv[1:]:
    try:
        open(path, "rb").read(1)
        print("READ", path)
    except PermissionError:
        print("DENIED", path)
"""


def _blocked_ancestor(path: Path) -> Path | None:
    """The first directory above ``path`` that other users cannot traverse."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def _as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``user`` (setpriv: uid, gid, supplementary groups), in a private
    mount namespace where this Python's installation is reachable by that user even if
    it lives under a private directory (e.g. pyenv under /root); nothing on the host
    changes."""
    base = Path(sys.base_prefix).resolve()
    blocked = _blocked_ancestor(base)
    script = 'u="$1"; shift; exec setpriv --reuid="$u" --regid="$u" --init-groups "$@"'
    if blocked is not None:
        top = blocked / base.relative_to(blocked).parts[0]
        script = (
            "set -e; t=$(mktemp -d); "
            f'mount --bind "{top}" "$t"; '
            f'mount -t tmpfs -o mode=0755 tmpfs "{blocked}"; '
            f'mkdir -p "{top}"; mount --move "$t" "{top}"; rmdir "$t"; ' + script
        )
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
               user, *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _call(user: str, settings: Path, *calls: tuple[str, dict]) -> list[dict]:
    calls = [(name, with_proofs(name, request)) for name, request in calls]
    done = _as_user(user, [sys.executable, "-c", RUNNER, json.dumps(calls), str(settings)])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reserve(num_conn: int) -> tuple[str, dict]:
    uid = str(uuid.uuid4())
    return uid, {"uid": uid, "role": "CONS", "num_conn": num_conn,
                 "key_sha256": hashlib.sha256(uid.encode()).hexdigest()}


@pytest.fixture(scope="module")
def local_users():
    if os.getuid() != 0:
        pytest.skip("needs root: creates two local users and runs functions as them")
    for tool in ("useradd", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (util-linux / passwd)")
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", user], check=True)
    return [pwd.getpwnam(u) for u in USERS]


@pytest.fixture
def user_gateways(local_users):
    """Per user: a 0700 directory owned by them with their gateway TOML and state."""
    base = Path(tempfile.mkdtemp(prefix="scistream-mu-"))
    os.chmod(base, 0o711)  # traversable, not listable
    paths = {}
    for entry in local_users:
        home = base / entry.pw_name
        home.mkdir(mode=0o700)
        settings = GatewaySettings(name=f"gw-{entry.pw_name}", state_dir=home / "state",
                                   port_min=PORTS[0], port_max=PORTS[1])
        path = home / "gateway.toml"
        path.write_text(settings.to_toml())
        os.chmod(path, 0o600)
        for p in (home, path):
            os.chown(p, entry.pw_uid, entry.pw_gid)
        paths[entry.pw_name] = (path, settings)
    yield paths
    leaked = proxy_pids(under=base)
    for pid in leaked:
        os.kill(pid, 9)
    shutil.rmtree(base, ignore_errors=True)
    assert not leaked, f"proxies left running: {leaked}"


def test_two_users_share_a_port_range_but_never_a_port_nor_their_state(user_gateways):
    (a, (a_toml, a_settings)), (b, (b_toml, b_settings)) = user_gateways.items()
    a_streams = [_reserve(3), _reserve(3)]
    b_streams = [_reserve(3), _reserve(3)]
    a_replies = _call(a, a_toml, *[("reserve", r) for _, r in a_streams])
    b_replies = _call(b, b_toml, *[("reserve", r) for _, r in b_streams])
    assert all("error" not in r for r in a_replies + b_replies), a_replies + b_replies
    a_ports = {x for r in a_replies for x in r["listeners"]}
    b_ports = {x for r in b_replies for x in r["listeners"]}
    assert len(a_ports) == len(b_ports) == 6 and not a_ports & b_ports
    everything = {f"127.0.0.1:{p}" for p in range(PORTS[0], PORTS[1] + 1)}
    assert a_ports | b_ports == everything
    # Each user's database still counts 6 ports free, but the kernel has none left.
    _, extra = _reserve(1)
    info, refused = _call(a, a_toml, ("gateway_info", {}), ("reserve", extra))
    assert info["free_ports"] == 6
    assert refused["error"]["code"] == "NO_RESOURCE" and "exhausted" in refused["error"]["message"]

    # The proxies run as their user; state and keys are private to that user.
    a_uid = pwd.getpwnam(a).pw_uid
    status = _call(a, a_toml, ("status", {"uid": a_streams[0][0]}))[0]
    assert status["alive"]
    with open(f"/proc/{status['pid']}/status") as fh:
        uids = next(line for line in fh if line.startswith("Uid:")).split()[1:]
    assert set(map(int, uids)) == {a_uid}
    a_dir = a_settings.state_dir / "streams" / a_streams[0][0]
    assert os.stat(a_settings.state_dir).st_mode & 0o777 == 0o700
    assert os.stat(a_settings.state_dir / "state.sqlite3").st_mode & 0o777 == 0o600
    assert os.stat(a_dir / "key.pem").st_mode & 0o777 == 0o600
    assert os.stat(a_dir / "key.pem").st_uid == a_uid
    secrets_of_a = [a_toml, a_settings.state_dir / "state.sqlite3", a_dir / "key.pem"]
    seen = _as_user(b, [sys.executable, "-c", READER, *map(str, secrets_of_a)])
    assert seen.stdout.split().count("DENIED") == 3, seen.stdout + seen.stderr
    # B pointing its functions at A's settings learns nothing and changes nothing.
    stolen = _call(b, a_toml, ("status", {"uid": a_streams[0][0]}))[0]
    assert stolen["error"]["code"] == "SERVER_ERR" and "Permission denied" in \
        stolen["error"]["message"]
    # B's gateway does not know A's streams; "releasing" one leaves A's proxy running.
    mine_only = _call(b, b_toml, ("status", {"uid": a_streams[0][0]}),
                      ("release", {"uid": a_streams[0][0]}))
    assert mine_only[0]["error"]["code"] == "INVALID_UID" and mine_only[1]["released"]
    assert _call(a, a_toml, ("status", {"uid": a_streams[0][0]}))[0]["alive"]

    for user, toml, streams in ((a, a_toml, a_streams), (b, b_toml, b_streams)):
        released = _call(user, toml, *[("release", {"uid": uid}) for uid, _ in streams])
        assert all(r["released"] for r in released)
    assert all(port_is_free(x) for x in everything)
