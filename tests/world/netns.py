"""The two-facility world's network: namespaces, links, addresses, routes and NAT, made
and removed by the harness itself (as root).

Seven namespaces, each name led by a per-run token so two runs never collide::

    app-p --LAN-- fac-p ==WAN (NAT)== wan ==WAN== fac-c --LAN-- app-c
                    \\                              /
                     `----- control ----- cloud --'
                                            |
                                          user

- ``fac-p`` / ``fac-c``: gateway nodes P and C, each with a LAN address (where its
  facility's apps reach its proxy) and a WAN address. They forward nothing.
- ``app-p`` / ``app-c``: the producer's and the consumer's hosts on those LANs; their only
  route is their own LAN, so an app reaches its own gateway's LAN address and nothing else.
- ``wan``: the router between the gateways' WAN sides, IPv4 and IPv6. It is also P's
  border NAT: P binds its own (private) WAN address, peers dial ``P_PUBLIC``.
- ``cloud``: the Globus services' stand-ins, RabbitMQ and the Prefect server, all on one
  address (``CLOUD``) that the gateways and the user reach over point-to-point links; it
  forwards nothing, so the control plane joins no two facilities.
- ``user``: the Prefect worker and the ``scistream`` CLI.

Addresses come from the documentation ranges (RFC 5737, RFC 3849); no namespace has a
default route or any link to the host, so nothing routes out.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CLOUD", "NAMESPACES", "World", "sweep", "world_env"]

NAMESPACES = ("fac-p", "app-p", "fac-c", "app-c", "wan", "cloud", "user")

# The plan. 192.0.2.0/24: the facilities' LANs and P's private WAN link; 203.0.113.0/24:
# the public WAN; 198.51.100.0/24: the control plane; 2001:db8::/32: the IPv6 WAN.
P_LAN, APP_P = "192.0.2.1", "192.0.2.2"          # 192.0.2.0/26
C_LAN, APP_C = "192.0.2.65", "192.0.2.66"        # 192.0.2.64/26
P_WAN, P_ROUTER = "192.0.2.130", "192.0.2.129"   # 192.0.2.128/30: behind P's NAT
P_PUBLIC = "203.0.113.9"                          # the NAT's address for P
C_WAN, C_ROUTER = "203.0.113.2", "203.0.113.1"   # 203.0.113.0/30
P_WAN6, P_ROUTER6 = "2001:db8:a::2", "2001:db8:a::1"
C_WAN6, C_ROUTER6 = "2001:db8:c::2", "2001:db8:c::1"
CLOUD = "198.51.100.100"                          # every cloud service listens here
_CONTROL = {"fac-p": ("198.51.100.1", "198.51.100.2"),   # (cloud's end, the node's end)
            "fac-c": ("198.51.100.5", "198.51.100.6"),
            "user": ("198.51.100.9", "198.51.100.10")}

# Where each world records its creator's pid, so that `sweep` can tell a world whose run
# died (kill -9, a lost CI job) from one that is running.
_OWNERS = Path("/run/scistream-world")
_PREFIX = "ssw"


def world_env(**extra: str) -> dict:
    """This process's environment for a process in the world, with ``extra``, and without
    the test suite's socket guard (tests/netguard_site allows only loopback): in the
    world the topology is the guard, since nothing routes out."""
    env = dict(os.environ, **extra)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).name != "netguard_site"]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _existing() -> list[str]:
    done = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                          check=True)
    return [entry["name"] for entry in json.loads(done.stdout or "[]")]


def _pids(name: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@dataclass
class World:
    """One run's namespaces; ``build()`` makes them, ``teardown()`` removes them and
    every process left inside them. A context manager does both."""

    token: str = field(default_factory=lambda: secrets.token_hex(3))
    built: bool = False

    def name(self, ns: str) -> str:
        """The system-wide name of namespace ``ns`` (one of :data:`NAMESPACES`)."""
        if ns not in NAMESPACES:
            raise ValueError(f"no namespace {ns!r} in the world; known: {NAMESPACES}")
        return f"{_PREFIX}{self.token}-{ns}"

    def argv_prefix(self, ns: str) -> list[str]:
        """What runs a command inside ``ns``."""
        return ["ip", "netns", "exec", self.name(ns)]

    def run(self, ns: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside ``ns`` (environment: :func:`world_env`)."""
        kwargs.setdefault("env", world_env())
        return subprocess.run([*self.argv_prefix(ns), *argv], **kwargs)

    def popen(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside ``ns`` (environment: :func:`world_env`)."""
        kwargs.setdefault("env", world_env())
        return subprocess.Popen([*self.argv_prefix(ns), *argv], **kwargs)

    # -- building -------------------------------------------------------------------

    def __enter__(self) -> World:
        self.build()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def build(self) -> None:
        _OWNERS.mkdir(mode=0o700, exist_ok=True)
        (_OWNERS / self.token).write_text(str(os.getpid()))
        self.built = True
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def _build(self) -> None:
        for ns in NAMESPACES:
            _ip("netns", "add", self.name(ns))
            self._sysctl(ns, "net.ipv4.ip_forward", 0 if ns != "wan" else 1)
            # default: the links made below take their settings from it, not from all.
            # No duplicate address detection: addresses (link-local ones too, which
            # neighbour discovery uses) are usable at once, not "tentative" for a while.
            for scope in ("all", "default"):
                self._sysctl(ns, f"net.ipv6.conf.{scope}.forwarding", 0 if ns != "wan" else 1)
                self._sysctl(ns, f"net.ipv6.conf.{scope}.accept_dad", 0)
            _ip("-n", self.name(ns), "link", "set", "lo", "up")
        # The LANs: each app host's only neighbour is its gateway's LAN address.
        self._link("fac-p", "lan0", f"{P_LAN}/26", "app-p", "lan0", f"{APP_P}/26")
        self._link("fac-c", "lan0", f"{C_LAN}/26", "app-c", "lan0", f"{APP_C}/26")
        # The WAN, through the wan router; P's side is private, behind the NAT.
        self._link("fac-p", "wan0", f"{P_WAN}/30", "wan", "p0", f"{P_ROUTER}/30")
        self._link("fac-c", "wan0", f"{C_WAN}/30", "wan", "c0", f"{C_ROUTER}/30")
        self._address("fac-p", "wan0", f"{P_WAN6}/64")
        self._address("wan", "p0", f"{P_ROUTER6}/64")
        self._address("fac-c", "wan0", f"{C_WAN6}/64")
        self._address("wan", "c0", f"{C_ROUTER6}/64")
        self._route("fac-p", "203.0.113.0/24", P_ROUTER)
        self._route("fac-c", "203.0.113.0/24", C_ROUTER)
        self._route("fac-p", "2001:db8:c::/64", P_ROUTER6)
        self._route("fac-c", "2001:db8:a::/64", C_ROUTER6)
        self._nat()
        # The control plane: one point-to-point link per client of the cloud.
        self._address("cloud", "lo", f"{CLOUD}/32")
        for ns, (cloud_end, node_end) in _CONTROL.items():
            self._link("cloud", f"to-{ns[-1]}", f"{cloud_end}/30", ns, "ctl0", f"{node_end}/30")
            self._route(ns, f"{CLOUD}/32", cloud_end)

    def _sysctl(self, ns: str, key: str, value: int) -> None:
        self.run(ns, ["sysctl", "-qw", f"{key}={value}"], check=True)

    def _link(self, ns_a: str, if_a: str, addr_a: str, ns_b: str, if_b: str,
              addr_b: str) -> None:
        _ip("-n", self.name(ns_a), "link", "add", if_a, "type", "veth", "peer", "name", if_b,
            "netns", self.name(ns_b))
        for ns, ifname, address in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
            self._address(ns, ifname, address)
            _ip("-n", self.name(ns), "link", "set", ifname, "up")

    def _address(self, ns: str, ifname: str, address: str) -> None:
        _ip("-n", self.name(ns), "addr", "add", address, "dev", ifname)

    def _route(self, ns: str, prefix: str, via: str) -> None:
        _ip("-n", self.name(ns), "route", "add", prefix, "via", via)

    def _nat(self) -> None:
        """P's border NAT on the wan router: the public address forwards to P, and P's
        connections leave from it. Nothing else reaches P's private address: the
        router drops a new connection to it that was not sent to the public address."""
        rules = f"""
        table ip nat {{
          chain prerouting {{
            type nat hook prerouting priority dstnat;
            ip daddr {P_PUBLIC} dnat to {P_WAN}
          }}
          chain postrouting {{
            type nat hook postrouting priority srcnat;
            ip saddr {P_WAN} snat to {P_PUBLIC}
          }}
        }}
        table ip filter {{
          chain forward {{
            type filter hook forward priority filter;
            ip daddr {P_WAN} ct state new ct original ip daddr != {P_PUBLIC} drop
          }}
        }}
        """
        self.run("wan", ["nft", "-f", "-"], input=rules, text=True, check=True,
                 capture_output=True)

    def forward_localhost(self, ns: str, port: int) -> None:
        """Connections in ``ns`` to 127.0.0.1:``port`` go to the cloud's same port: for a
        client that expects a service on localhost (the Compute SDK's ``local``
        environment), in the kernel (no relay process)."""
        self._sysctl(ns, "net.ipv4.conf.all.route_localnet", 1)
        rules = f"""
        table ip localhost_{port} {{
          chain output {{
            type nat hook output priority -100;
            ip daddr 127.0.0.1 tcp dport {port} dnat to {CLOUD}:{port}
          }}
          chain postrouting {{
            type nat hook postrouting priority srcnat;
            ip saddr 127.0.0.0/8 ip daddr {CLOUD} masquerade
          }}
        }}
        """
        self.run(ns, ["nft", "-f", "-"], input=rules, text=True, check=True,
                 capture_output=True)

    # -- removing -------------------------------------------------------------------

    def teardown(self) -> None:
        """Kill every process left in the world's namespaces, then delete them."""
        names = [n for n in _existing() if n.startswith(f"{_PREFIX}{self.token}-")]
        _remove(names)
        (_OWNERS / self.token).unlink(missing_ok=True)
        self.built = False

    def left(self) -> dict:
        """What of this world remains: namespaces, the processes in them and their
        listening sockets. ``{}`` when nothing does."""
        names = [n for n in _existing() if n.startswith(f"{_PREFIX}{self.token}-")]
        report: dict = {}
        if names:
            report["namespaces"] = names
        processes = {f"{name}:{pid}": _cmdline(pid) for name in names for pid in _pids(name)}
        if processes:
            report["processes"] = processes
        listening = {}
        for name in names:
            done = subprocess.run(["ip", "netns", "exec", name, "ss", "-Htlnu"],
                                  capture_output=True, text=True)
            sockets = [line.split()[4] for line in done.stdout.splitlines() if line.split()]
            if sockets:
                listening[name] = sockets
        if listening:
            report["listening"] = listening
        return report


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has ended: its parent only has to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _remove(names: list[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for name in names for pid in _pids(name)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.05)
        if not pids:
            break
    for name in names:
        _ip("netns", "del", name)


def sweep() -> list[str]:
    """Remove the worlds whose creating process is gone; return their namespaces."""
    if not _OWNERS.is_dir():
        return []
    removed = []
    for record in _OWNERS.iterdir():
        try:
            os.kill(int(record.read_text()), 0)
            continue
        except (ValueError, ProcessLookupError):
            pass
        names = [n for n in _existing() if n.startswith(f"{_PREFIX}{record.name}-")]
        _remove(names)
        record.unlink(missing_ok=True)
        removed += names
    return removed
