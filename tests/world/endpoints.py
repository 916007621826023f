"""Real Globus Compute endpoint daemons for the world, set up as an operator would.

The functions are registered with ``scistream-gateway register``; the shipped configs
(``endpoint_configs/single_user/`` or ``multi_user/``) are rendered with
``scistream-gateway render-config`` and installed with the ``globus-compute-endpoint
configure`` command it prints; ``globus-compute-endpoint start NAME`` runs the daemon in
the foreground, so this module owns its process. Every command runs under a private
HOME, with ``GLOBUS_SDK_ENVIRONMENT=local`` (the web service at localhost:5000), Auth
at the stand-in (``GLOBUS_SDK_SERVICE_URL_AUTH``) and the endpoint's client credentials
in its environment, never in argv. ``argv_prefix`` runs it inside a network namespace.
The environment starts from :func:`world.netns.world_env`, without the test suite's
socket guard, so a daemon behaves the same whichever namespace its creator runs in.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from world.broker import descendants
from world.netns import world_env

__all__ = ["EndpointDaemon", "EndpointError", "as_user", "globus_env", "register_functions"]

BIN = Path(sys.executable).parent


class EndpointError(RuntimeError):
    """A command or the daemon failed; the message carries the log's tail."""


def _blocked_ancestor(path: Path) -> Path | None:
    """The first directory above ``path`` that other users cannot traverse."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def as_user(user: str | None) -> list[str]:
    """An argv prefix: run in a private mount namespace where this Python is reachable
    by other users even if it lives under a private directory (pyenv under /root), as
    ``user`` (uid, gid, groups) if given. A multi-user endpoint's user endpoints, which
    it starts as the mapped users, inherit that namespace. Nothing on the host changes."""
    base = Path(sys.base_prefix).resolve()
    blocked = _blocked_ancestor(base)
    script = ('u="$1"; shift; if [ -n "$u" ]; then exec setpriv --reuid="$u" --regid="$u"'
              ' --init-groups "$@"; else exec "$@"; fi')
    if blocked is not None:
        top = blocked / base.relative_to(blocked).parts[0]
        script = ("set -e; t=$(mktemp -d); "
                  f'mount --bind "{top}" "$t"; '
                  f'mount -t tmpfs -o mode=0755 tmpfs "{blocked}"; '
                  f'mkdir -p "{top}"; mount --move "$t" "{top}"; rmdir "$t"; ' + script)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            user or ""]


def globus_env(home: Path, auth_url: str, client: tuple[str, str]) -> dict[str, str]:
    """The environment of a Globus client on this world: a private HOME, the local
    Compute environment, Auth at the stand-in, the confidential client's credentials."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in world_env().items()
           if not k.startswith(("GLOBUS_", "SCISTREAM_GLOBUS_"))}
    env.update({
        "HOME": str(home),
        "GLOBUS_COMPUTE_USER_DIR": str(home / ".globus_compute"),
        "GLOBUS_SDK_ENVIRONMENT": "local",
        "GLOBUS_SDK_SERVICE_URL_AUTH": auth_url.rstrip("/") + "/",
        "GLOBUS_COMPUTE_CLIENT_ID": client[0],
        "GLOBUS_COMPUTE_CLIENT_SECRET": client[1],
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
    })
    return env


def _run(argv: list[str], env: dict[str, str], what: str, timeout_s: float = 120) -> str:
    """Run a command to completion; its stdout and stderr."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise EndpointError(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                            f"{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def register_functions(output: Path, env: dict[str, str],
                       argv_prefix: list[str] | None = None) -> dict[str, str]:
    """``scistream-gateway register --output`` as the operator runs it; name -> UUID."""
    _run([*(argv_prefix or []), str(BIN / "scistream-gateway"), "register",
          "--output", str(output)], env, "scistream-gateway register")
    return json.loads(output.read_text())


class EndpointDaemon:
    """One endpoint: ``configure()`` once, then ``start()`` / ``stop()`` / ``kill()``.

    Single-user: ``settings`` is the gateway TOML its workers read; ``user`` the Unix
    user it runs as (owner of ``home`` and the gateway's state). Multi-user (as root):
    ``settings_dir`` holds ``<user>.toml`` per mapped user, ``identity_mapping`` the
    mapping JSON."""

    def __init__(self, name: str, *, home: Path, env: dict[str, str], functions: Path,
                 settings: Path | None = None, multi_user: bool = False,
                 settings_dir: Path | None = None, identity_mapping: Path | None = None,
                 user: str | None = None, argv_prefix: list[str] | None = None):
        self.name, self.home, self.env = name, home, env
        self.functions, self.settings, self.multi_user = functions, settings, multi_user
        self.settings_dir, self.identity_mapping = settings_dir, identity_mapping
        # Every command as the operator would run it: as ``user`` (a single-user
        # endpoint must not run as root: globus-compute-endpoint then counts it as
        # multi-user), in the mount namespace of :func:`as_user`.
        self.prefix = [*(argv_prefix or []), *as_user(user)]
        self.dir = Path(env["GLOBUS_COMPUTE_USER_DIR"]) / name
        self.proc: subprocess.Popen | None = None
        self._console = None

    @property
    def log_path(self) -> Path:
        return self.dir / "endpoint.log"

    @property
    def endpoint_id(self) -> str:
        return json.loads((self.dir / "endpoint.json").read_text())["endpoint_id"]

    def configure(self) -> None:
        """render-config, then the configure command it prints (run as printed)."""
        rendered = self.home / f"rendered-{self.name}"
        argv = [str(BIN / "scistream-gateway"), "render-config", "--functions",
                str(self.functions), "--output-dir", str(rendered),
                "--endpoint-name", self.name]
        if self.multi_user:
            argv += ["--multi-user", "--settings-dir", str(self.settings_dir),
                     "--identity-mapping", str(self.identity_mapping)]
        else:
            argv += ["--settings", str(self.settings)]
        out = _run([*self.prefix, *argv], self.env, "scistream-gateway render-config")
        configure = next(shlex.split(line) for line in out.splitlines()
                         if line.strip().startswith("globus-compute-endpoint configure"))
        configure = [str(BIN / configure[0]), *configure[1:]]
        if "--contact-email" in configure:
            configure[configure.index("--contact-email") + 1] = "operator@example.org"
        _run([*self.prefix, *configure], self.env, "globus-compute-endpoint configure")

    def start(self, timeout_s: float = 120.0) -> EndpointDaemon:
        """Start the daemon; return once it registered and its command loop began."""
        if self.log_path.exists():
            self.log_path.rename(self.log_path.with_suffix(f".{time.time_ns()}.log"))
        self._console = open(self.home / f"{self.name}.console", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, str(BIN / "globus-compute-endpoint"), "start", self.name],
            env=self.env, stdin=subprocess.DEVNULL, stdout=self._console,
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while "Core Endpoint begins" not in self._log_text():
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self._reap()
                raise EndpointError(f"endpoint {self.name} exited:\n{tail}")
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.kill()
                raise EndpointError(f"endpoint {self.name} did not start in {timeout_s} s:"
                                    f"\n{tail}")
            time.sleep(0.1)
        return self

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        console = self.home / f"{self.name}.console"
        text = console.read_text(errors="replace") if console.exists() else ""
        return "\n".join((text + self._log_text()).splitlines()[-lines:])

    def user_endpoint_logs(self) -> str:
        """The user endpoints' logs under this daemon's HOME (single-user)."""
        return "\n".join(p.read_text(errors="replace")[-4000:]
                         for p in sorted(self.dir.parent.glob("uep.*/endpoint.log")))

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, as systemd would; then KILL whatever of its process tree is left
        (the gateway's relays are double-forked away from it and are not touched)."""
        if self.proc is None:
            return
        tree = descendants([self.proc.pid])
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill(tree)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the daemon and its user endpoints: a crash."""
        if self.proc is None:
            return
        self._kill(descendants([self.proc.pid]))
        self._reap()

    def restart(self, timeout_s: float = 120.0) -> EndpointDaemon:
        self.stop()
        return self.start(timeout_s)

    @staticmethod
    def _kill(pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait()
            self.proc = None
        if self._console is not None:
            self._console.close()
            self._console = None
