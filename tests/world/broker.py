"""A private RabbitMQ node (Debian's rabbitmq-server): start, users, readiness, clean stop.

Every path of the node (database, logs, config, Erlang cookie) is in its own temporary
directory; it has its own node name, AMQP port, distribution port and its own epmd, which
this module starts on its own port in the foreground, so stopping the broker stops every
process it started and nothing else. ``argv_prefix`` runs all of it inside a network
namespace (``["ip", "netns", "exec", NAME]``); on the host's loopback it is ``[]``.

The vhost and the admin user come from the node's config file (no extra Erlang VM to
start); further users (one per endpoint, made by the web-service stand-in) are added
with ``rabbitmqctl``, the password on its stdin, never in argv.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

__all__ = ["Broker", "BrokerError", "RABBITMQ_BIN", "available"]

# The unwrapped scripts: /usr/sbin/rabbitmq-server would switch to the rabbitmq user.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class BrokerError(RuntimeError):
    """The broker did not start, or a rabbitmqctl command failed (with its log tail)."""


def available() -> bool:
    """Whether Debian's rabbitmq-server (and epmd) are installed."""
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and shutil.which("epmd") is not None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Broker:
    """One RabbitMQ node. ``start()`` returns once it accepts AMQP; ``stop()`` ends it.

    Ports default to free ones on loopback when ``argv_prefix`` is empty, else to
    RabbitMQ's own (5672, epmd 4369, distribution 25672): a namespace is private.
    """

    def __init__(self, *, host: str = "127.0.0.1", amqp_port: int | None = None,
                 epmd_port: int | None = None, dist_port: int | None = None,
                 argv_prefix: list[str] | None = None, vhost: str = "scistream",
                 root: str | os.PathLike | None = None):
        self.argv_prefix = list(argv_prefix or [])
        loopback = not self.argv_prefix
        self.host = host
        self.amqp_port = amqp_port or (_free_port(host) if loopback else 5672)
        self.epmd_port = epmd_port or (_free_port("127.0.0.1") if loopback else 4369)
        self.dist_port = dist_port or (_free_port("127.0.0.1") if loopback else 25672)
        self.vhost = vhost
        self.admin_user, self.admin_password = "admin", secrets.token_urlsafe(18)
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="rabbitmq-"))
        self.node = f"rabbit-{secrets.token_hex(4)}@localhost"
        self._attached = False
        self._epmd: subprocess.Popen | None = None
        self._server: subprocess.Popen | None = None

    @classmethod
    def attach(cls, state: str | os.PathLike) -> Broker:
        """A handle on a running node from its :meth:`save_state` file, for a process
        in the node's own namespace (``rabbitmqctl`` runs without a prefix). Its
        ``stop()`` stops nothing: the node belongs to whoever started it."""
        data = json.loads(Path(state).read_text())
        broker = cls(host=data["host"], amqp_port=data["amqp_port"],
                     epmd_port=data["epmd_port"], dist_port=data["dist_port"],
                     vhost=data["vhost"], root=data["root"])
        broker.node, broker.admin_password = data["node"], data["admin_password"]
        broker._attached = True
        return broker

    def save_state(self) -> Path:
        """Write what :meth:`attach` needs (the admin password too) to an owner-only file
        in the node's directory; returns its path."""
        path = self.root / "broker.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"host": self.host, "amqp_port": self.amqp_port,
                       "epmd_port": self.epmd_port, "dist_port": self.dist_port,
                       "vhost": self.vhost, "root": str(self.root), "node": self.node,
                       "admin_password": self.admin_password}, f)
        return path

    # -- what clients need
    def url(self, user: str | None = None, password: str | None = None,
            host: str | None = None) -> str:
        """An AMQP URL for ``user`` (default: the admin) on this node's vhost."""
        user = user or self.admin_user
        password = password if password is not None else self.admin_password
        host = host or self.host
        netloc = f"[{host}]" if ":" in host else host
        return (f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{netloc}:"
                f"{self.amqp_port}/{quote(self.vhost, safe='')}")

    # -- life cycle
    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": str(self.root),  # the Erlang cookie lives here
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbit.pid"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _write_config(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[].\n")
        conf = self.root / "rabbitmq.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join([
                f"listeners.tcp.default = {self.host}:{self.amqp_port}"
                if ":" not in self.host else f"listeners.tcp.default = [{self.host}]:"
                                               f"{self.amqp_port}",
                f"default_vhost = {self.vhost}",
                f"default_user = {self.admin_user}",
                f"default_pass = {self.admin_password}",
                "default_permissions.configure = .*",
                "default_permissions.read = .*",
                "default_permissions.write = .*",
                "default_user_tags.administrator = true",
                # Users other than the admin reach it from other namespaces.
                "loopback_users = none",
                "log.console = false",
                "log.file.level = info",
                # A test node runs on whatever disk there is.
                "disk_free_limit.absolute = 1MB",
                "",
            ]))
        cookie = self.root / ".erlang.cookie"
        fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))

    def start(self, timeout_s: float = 60.0) -> Broker:
        """Start epmd and the node; return once the node's AMQP listener is up."""
        self._write_config()
        env = self._env()
        try:
            self._epmd = subprocess.Popen(
                [*self.argv_prefix, "epmd", "-port", str(self.epmd_port),
                 "-address", "127.0.0.1"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
            log = open(self.root / "server.out", "wb")  # noqa: SIM115 - closed below
            with log:
                self._server = subprocess.Popen(
                    [*self.argv_prefix, str(RABBITMQ_BIN / "rabbitmq-server")],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            self._await_boot(timeout_s)
            self.save_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _await_boot(self, timeout_s: float) -> None:
        """Wait for the node's log to say it booted (after its listeners started): a
        file read, so it works from outside the node's namespace, and starts no VM."""
        log = self.root / "log" / f"{self.node}.log"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if "Server startup complete" in log.read_text(errors="replace"):
                    return
            except FileNotFoundError:
                pass
            if self._server.poll() is not None:
                raise BrokerError(f"the broker exited ({self._server.returncode}):\n"
                                  f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"the broker did not boot in {timeout_s} s:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.05)

    def ctl(self, *args: str, stdin: str | None = None, timeout_s: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node; returns its stdout."""
        if self._server is not None and self._server.poll() is not None:
            raise BrokerError(f"the broker exited ({self._server.returncode}):\n"
                              f"{self.log_tail()}")
        try:
            done = subprocess.run(
                [*self.argv_prefix, str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node,
                 "--quiet", *args],
                env=self._env(), input=stdin, capture_output=True, text=True,
                timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BrokerError(f"rabbitmqctl {args[0]} timed out:\n{self.log_tail()}") from None
        if done.returncode != 0:
            raise BrokerError(f"rabbitmqctl {args[0]} failed ({done.returncode}): "
                              f"{done.stderr.strip() or done.stdout.strip()}\n"
                              f"{self.log_tail()}")
        return done.stdout

    def add_user(self, user: str, password: str, *, configure: str, write: str,
                 read: str) -> None:
        """A user of this vhost with the given permission regexes (RabbitMQ's model)."""
        self.ctl("add_user", user, stdin=password + "\n")
        self.ctl("set_permissions", "-p", self.vhost, user, configure, write, read)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in [self.root / "server.out", *sorted((self.root / "log").glob("*.log"))]:
            try:
                out += path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(out[-lines:])

    def alive(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """TERM the node (its script stops the VM) and epmd, then KILL any process of
        theirs still alive (the VM's helpers, erl_child_setup and inet_gethost, run in
        sessions of their own). Removes the node's directory if this object made it."""
        if self._attached:
            return
        procs = [p for p in (self._server, self._epmd) if p is not None]
        tree = descendants([p.pid for p in procs])
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait()
        self._server = self._epmd = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them now (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found[::-1]
