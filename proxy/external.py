"""S2DS backends that run an external proxy: stunnel, HAProxy and nginx as subprocesses.

Ports from ``reserve`` to ``connect``: the gateway binds the stream's listening
sockets at ``reserve`` and a port holder (``scistream_proxy.holder``) keeps them. At
``connect`` the backend renders the proxy's config into the stream's 0700 directory,
takes the very same sockets back from the holder (SCM_RIGHTS) and starts the proxy
with them inherited at descriptors 3, 4, ...: HAProxy binds ``fd@3``, nginx takes them
through its ``NGINX`` inheritance variable, stunnel through systemd socket activation
(``LISTEN_FDS``). The sockets never close in between, so no other stream can take a
port and connections queued early stay queued. The holder exits once the proxy is
ready.

Every proxy runs in the foreground under ``scistream_proxy.launch`` (no
self-daemonizing), is tracked by pid + start time, and is stopped through a pidfd;
worker processes it forked (nginx) are found by their session and stopped too.
Configs name files relative to the stream directory (the proxy's working directory),
so no path from outside reaches a config; addresses were validated by the gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from string import Template

from scistream_proxy import procfs
from scistream_proxy.backends import (
    GatewayOptions,
    ProxyBackend,
    ProxyError,
    ProxySpec,
    connect_in_dir,
)
from scistream_proxy.leaks import working_dirs
from scistream_proxy.limits import conn_cap
from scistream_proxy.addresses import format_address, parse_address
from scistream_proxy.process import (
    ProcessIdentity,
    ProxyStartError,
    spawn_detached,
    terminate,
)
from scistream_proxy.tls import write_private

__all__ = ["HAProxyBackend", "HeldPortsBackend", "NginxBackend", "StunnelBackend"]

HOLDER_LOG = "holder.log"
PROXY_LOG = "proxy.log"
PROCESS_FILE = "proxy-process.json"  # written as soon as the proxy runs: stop finds it
READY_TIMEOUT_S = 10.0


def render_template(name: str, **values: object) -> str:
    """A config template of ``scistream_proxy/templates`` with ``$names`` filled in.

    Every value is ours or passed the gateway's validation (addresses, numbers, file
    names relative to the stream directory); a missing one is a KeyError, not a gap.
    """
    from importlib.resources import files

    text = files("scistream_proxy").joinpath("templates", name).read_text()
    return Template(text).substitute(values)


def unix_request(stream_dir: Path, name: str, payload: bytes, timeout_s: float = 5.0,
                 *, want_fds: int = 0) -> tuple[bytes, list[int]]:
    """Send ``payload`` to the unix socket ``name`` in ``stream_dir``; read the reply
    (to the end, or its first line when descriptors come with it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        fds: list[int] = []
        try:
            connect_in_dir(sock, stream_dir, name)
            sock.sendall(payload)
            chunks = []
            while True:
                if want_fds and not fds:
                    data, fds, _, _ = socket.recv_fds(sock, 65536, want_fds)
                else:
                    data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if want_fds and data.endswith(b"\n"):
                    break
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise ProxyError(f"{name}: {exc}") from None
    return b"".join(chunks), fds


def holder_request(stream_dir: Path, op: str, *, want_fds: int = 0) -> tuple[dict, list[int]]:
    from scistream_proxy.holder import CONTROL_SOCKET

    raw, fds = unix_request(stream_dir, CONTROL_SOCKET, json.dumps({"op": op}).encode() + b"\n",
                            want_fds=want_fds)
    try:
        reply = json.loads(raw.split(b"\n", 1)[0])
    except ValueError:
        reply = {"ok": False, "error": f"port holder replied {raw[:200]!r}"}
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        raise ProxyError(f"port holder refused {op}: {reply.get('error', reply)}")
    return reply, fds


def _identity(record: dict | None) -> ProcessIdentity | None:
    if not record:
        return None
    return ProcessIdentity(int(record["pid"]), int(record["start_time"]))


def works_in(pid: int, stream_dir: Path) -> bool:
    """Whether ``pid`` works in ``stream_dir`` (also after the directory was deleted:
    the kernel then appends " (deleted)"). Every process a backend starts for a stream
    does, and no other process has a reason to."""
    return procfs.cwd(pid).removesuffix(" (deleted)") == os.path.realpath(stream_dir)


def stop_in(identity: ProcessIdentity, stream_dir: Path, grace_s: float = 2.0) -> None:
    """Stop the recorded process if it is still the one recorded *and* works in the
    stream's directory: after a reboot, pid and start time may name another process."""
    if works_in(identity.pid, stream_dir):
        terminate(identity, grace_s=grace_s)


def stop_session(sid: int, not_before: int, stream_dir: Path) -> None:
    """Kill what is left of a proxy's session (worker processes whose master died).

    Only processes of that session, started no earlier than the proxy, that work in
    the stream's directory: a session id is reused once its session is gone, and a
    later session's processes start later too, so only the directory keeps them apart.
    """
    for pid in procfs.pids():
        stat = procfs.stat(pid)
        if stat is None or int(stat[3]) != sid or int(stat[19]) < not_before:
            continue
        stop_in(ProcessIdentity(pid, int(stat[19])), stream_dir, grace_s=0)


class HeldPortsBackend(ProxyBackend):
    """A proxy configured at ``connect``, whose ports a holder keeps from ``reserve``.

    Subclasses say how to find the program and render its config; this class owns the
    holder, the launch with the ready handshake, status and the stop without orphans.
    """

    binaries: tuple[str, ...] = ()
    reuseport = False  # the holder's sockets join a SO_REUSEPORT group (containers)
    counters_detail = "byte counters are not exposed by this backend"

    # -- discovery --------------------------------------------------------------
    def binary(self) -> str | None:
        for name in self.binaries:
            found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
            if found:
                return found
        return None

    def unavailable_reason(self) -> str | None:
        if self.binary() is None:
            return f"{' or '.join(self.binaries)} not found on PATH (nor in /usr/sbin, /sbin)"
        return None

    # -- reserve ------------------------------------------------------------------
    def start(self, spec: ProxySpec) -> dict:
        fds = [s.fileno() for s in spec.sockets]
        try:
            holder = spawn_detached(
                [sys.executable, "-P", "-m", "scistream_proxy.holder",
                 "--stream-dir", str(spec.stream_dir), "--fds", ",".join(map(str, fds))],
                cwd=spec.stream_dir, log_path=spec.stream_dir / HOLDER_LOG, pass_fds=tuple(fds),
            )
        except ProxyStartError as exc:
            raise ProxyError(f"port holder failed to start: {exc}") from None
        if self.reuseport:
            try:
                holder_request(spec.stream_dir, "steer")
            except ProxyError:
                self._stop_holder(spec.stream_dir, holder)
                raise
        return {
            "holder": {"pid": holder.pid, "start_time": holder.start_time},
            "role": spec.role,
            "rate": spec.rate,
            "uid": spec.uid,
            "listeners": [format_address(*s.getsockname()[:2]) for s in spec.sockets],
        }

    # -- connect ------------------------------------------------------------------
    def render(self, stream_dir: Path, handle: dict, *, targets: list[str], tls: bool,
               peer_cert_file: str | None) -> dict:
        """Write the proxy's config; return the launch spec (argv, env, ready)."""
        raise NotImplementedError

    def connect(self, handle, stream_dir, *, targets, tls, peer_cert_file, peer_fingerprint):
        holder = _identity(handle.get("holder"))
        if handle.get("pid"):
            return handle  # already running (a repeated connect)
        if holder is None or not holder.alive():
            raise ProxyError("the port holder of this stream is gone")
        launch = self.render(stream_dir, handle, targets=targets, tls=tls,
                             peer_cert_file=peer_cert_file)
        _, fds = holder_request(stream_dir, "fds", want_fds=len(handle["listeners"]))
        try:
            if len(fds) != len(handle["listeners"]):
                raise ProxyError(f"port holder passed {len(fds)} sockets, "
                                 f"{len(handle['listeners'])} expected")
            launch["listen_fds"] = fds
            write_private(stream_dir / "launch.json", json.dumps(launch).encode())
            identity = spawn_detached(
                [sys.executable, "-P", "-m", "scistream_proxy.launch",
                 "--spec", str(stream_dir / "launch.json"), "--log", str(stream_dir / PROXY_LOG),
                 "--timeout", str(READY_TIMEOUT_S)],
                cwd=stream_dir, log_path=stream_dir / PROXY_LOG, pass_fds=tuple(fds),
                ready_timeout_s=READY_TIMEOUT_S + 5,
            )
        except ProxyStartError as exc:
            raise ProxyError(f"{self.name} failed to start: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sid = os.getsid(identity.pid)
        except ProcessLookupError:
            raise ProxyError(f"{self.name} exited right after it was ready: "
                             f"see {PROXY_LOG} in the stream directory") from None
        record = {"pid": identity.pid, "start_time": identity.start_time, "sid": sid}
        write_private(stream_dir / PROCESS_FILE, json.dumps(record).encode())
        self._stop_holder(stream_dir, holder)
        return {**handle, **record, "holder": None, "tls": tls}

    @staticmethod
    def _stop_holder(stream_dir: Path, holder: ProcessIdentity) -> None:
        if holder.alive():
            try:
                holder_request(stream_dir, "release")
            except ProxyError:
                pass  # stop_in() below escalates
        stop_in(holder, stream_dir)

    # -- status / stop ------------------------------------------------------------
    def counters(self, handle: dict, stream_dir: Path) -> dict | None:
        """Byte and connection counters where the proxy exposes them, else None."""
        return None

    def status(self, handle, stream_dir):
        proxy = _identity(handle) if handle.get("pid") else None
        if proxy is None:
            holder = _identity(handle.get("holder"))
            alive = holder is not None and holder.alive()
            return {"alive": alive, "bytes": None, "pid": holder.pid if holder else None,
                    "detail": "ports held until connect" if alive else "port holder is gone"}
        if not proxy.alive():
            return {"alive": False, "bytes": None, "pid": proxy.pid,
                    "detail": f"{self.name} process is gone"}
        return self.with_counters({"alive": True, "pid": proxy.pid}, handle, stream_dir)

    def with_counters(self, reply: dict, handle: dict, stream_dir: Path) -> dict:
        """``reply`` of a live proxy with its byte counters, or a detail saying why none."""
        reply.update(bytes=None, detail=self.counters_detail)
        try:
            counters = self.counters(handle, stream_dir)
        except ProxyError as exc:
            counters, reply["detail"] = None, f"counters unavailable: {exc}"
        if counters is not None:
            reply.update(counters, detail="")
        return reply

    def stop(self, handle, stream_dir):
        records = [handle]
        try:  # a proxy started by a connect whose state update never committed
            records.append(json.loads((stream_dir / PROCESS_FILE).read_text()))
        except (OSError, ValueError):
            pass
        for record in records:
            proxy = _identity(record) if record.get("pid") else None
            if proxy is None:
                continue
            stop_in(proxy, stream_dir, grace_s=0)
            stop_session(int(record["sid"]), proxy.start_time, stream_dir)
        holder = _identity(handle.get("holder"))
        if holder is not None:
            self._stop_holder(stream_dir, holder)


    def abandon(self, stream_dir: Path, uid: str) -> None:
        # A proxy whose connect never recorded it (its process file names it), then
        # anything else working in the stream's directory: a holder whose reserve never
        # recorded it, a launcher, nginx workers.
        HeldPortsBackend.stop(self, {"holder": None}, stream_dir)
        for pid in working_dirs(stream_dir):
            identity = ProcessIdentity.of(pid)
            if identity is not None:
                terminate(identity, grace_s=0)


def _ssl_files(stream_dir: Path, tls: bool) -> None:
    if tls and not (stream_dir / "peer.pem").exists():
        raise ProxyError("the peer's certificate is missing")


def _stunnel_address(address: str) -> str:
    """``host:port`` as stunnel reads it: split at the last colon, an IPv6 host bare
    (``::1:5000``; stunnel resolves ``[::1]`` as a host name and fails)."""
    host, port = parse_address(address)
    return f"{host}:{port}"


class StunnelBackend(HeldPortsBackend):
    """stunnel: one service per listener; TLS only (stunnel cannot relay plain TCP)."""

    name = "stunnel"
    binaries = ("stunnel4", "stunnel")
    supports_plain = False
    counters_detail = "stunnel exposes no byte counters"

    def render(self, stream_dir, handle, *, targets, tls, peer_cert_file):
        if not tls:
            raise ProxyError("stunnel cannot relay without TLS")
        _ssl_files(stream_dir, tls)
        server = handle["role"] == "PROD"
        text = render_template("stunnel.conf") + "".join(
            render_template("stunnel-service.conf", index=index,
                            listener=_stunnel_address(listener),
                            target=_stunnel_address(targets[index % len(targets)]),
                            client="no" if server else "yes", peer_cert=peer_cert_file)
            for index, listener in enumerate(handle["listeners"]))
        write_private(stream_dir / "stunnel.conf", text.encode())
        return {"argv": [self.binary(), "stunnel.conf"], "env": {"PATH": "/usr/bin:/bin"},
                "listen_pid_env": True,
                "ready": {"kind": "log", "pattern": "Configuration successful"}}


def write_haproxy_pem(stream_dir: Path) -> None:
    """HAProxy takes certificate and key from one file: ``haproxy.pem`` (0600)."""
    _ssl_files(stream_dir, True)
    pem = (stream_dir / "cert.pem").read_bytes() + (stream_dir / "key.pem").read_bytes()
    write_private(stream_dir / "haproxy.pem", pem)


class HAProxyBackend(HeldPortsBackend):
    """HAProxy in TCP mode: listeners bound as ``fd@N``, counters on its stats socket."""

    name = "haproxy"
    binaries = ("haproxy",)
    stats_socket = "haproxy.sock"

    def config(self, handle: dict, *, targets: list[str], tls: bool, peer_cert_file: str | None,
               binds: list[str], stats: str) -> str:
        server = handle["role"] == "PROD"
        # The peer's certificate is the only CA; on the producer side the exact
        # fingerprint of what the peer presents is checked too.
        tls_options = (f" ssl crt haproxy.pem ca-file {peer_cert_file} verify required"
                       " ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3")
        rule = ("    tcp-request session reject unless "
                f"{{ ssl_c_der,sha2(256),hex,lower -m str {handle.get('peer_fp')} }}\n")
        parts = [render_template("haproxy.cfg", stats=stats, maxconn=conn_cap(
            self.options.conn_per_listener, len(binds)),
            handshake_timeout=self.options.handshake_timeout_s)]
        for index, bind in enumerate(binds):
            parts.append(render_template(
                "haproxy-connection.cfg", index=index, bind=bind,
                target=targets[index % len(targets)],
                bind_tls=tls_options if tls and server else "",
                server_tls=tls_options + " no-ssl-reuse" if tls and not server else "",
                session_rule=rule if tls and server else "",
            ))
        return "".join(parts)

    def _write_tls(self, stream_dir: Path, handle: dict, tls: bool, peer_fp: str | None) -> None:
        if tls:
            write_haproxy_pem(stream_dir)
            handle["peer_fp"] = peer_fp

    def connect(self, handle, stream_dir, *, targets, tls, peer_cert_file, peer_fingerprint):
        handle = {**handle}
        self._write_tls(stream_dir, handle, tls, peer_fingerprint)
        return super().connect(handle, stream_dir, targets=targets, tls=tls,
                               peer_cert_file=peer_cert_file, peer_fingerprint=peer_fingerprint)

    def render(self, stream_dir, handle, *, targets, tls, peer_cert_file):
        binds = [f"fd@{3 + i}" for i in range(len(handle["listeners"]))]
        text = self.config(handle, targets=targets, tls=tls, peer_cert_file=peer_cert_file,
                           binds=binds, stats=f"unix@{self.stats_socket}")
        write_private(stream_dir / "haproxy.cfg", text.encode())
        return {"argv": [self.binary(), "-db", "-f", "haproxy.cfg"],
                "env": {"PATH": "/usr/bin:/bin"}, "ready": {"kind": "epoll"}}

    def counters(self, handle, stream_dir):
        return haproxy_counters(stream_dir, self.stats_socket, handle["role"])


def haproxy_counters(stream_dir: Path, socket_name: str, role: str) -> dict:
    """Totals from HAProxy's ``show stat``, as the native proxy reports them."""
    raw, _ = unix_request(stream_dir, socket_name, b"show stat\n")
    lines = raw.decode(errors="replace").strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ProxyError(f"unexpected stats reply {raw[:200]!r}")
    header = lines[0][2:].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]

    def total(kind: str, column: str) -> int:
        return sum(int(r.get(column) or 0) for r in rows if r.get("svname") == kind)

    # HAProxy counts client -> server as "bin", server -> client as "bout". The app is
    # HAProxy's server on the producer side and its client on the consumer side.
    client_to_server, server_to_client = total("FRONTEND", "bin"), total("FRONTEND", "bout")
    if role == "PROD":
        to_app, from_app = client_to_server, server_to_client
    else:
        to_app, from_app = server_to_client, client_to_server
    return {
        "bytes": {"to_app": to_app, "from_app": from_app},
        "connections": {"active": total("FRONTEND", "scur"),
                        "total": total("FRONTEND", "stot"),
                        "failed": total("BACKEND", "econ") + total("FRONTEND", "ereq")},
    }


NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


class NginxBackend(HeldPortsBackend):
    """nginx's stream module: sockets inherited through ``NGINX``, per-connection rates."""

    name = "nginx"
    binaries = ("nginx",)
    supports_rate = True
    counters_detail = "nginx (open source) exposes no byte counters for streams"

    def unavailable_reason(self) -> str | None:
        reason = super().unavailable_reason()
        if reason is None and self._stream_module() is False:
            reason = f"nginx's stream module is missing ({NGINX_STREAM_MODULE}: " \
                     "install libnginx-mod-stream)"
        return reason

    def _stream_module(self) -> bool | None:
        """True: load the dynamic module; None: built in; False: missing."""
        if os.path.exists(NGINX_STREAM_MODULE):
            return True
        import subprocess

        try:
            out = subprocess.run([self.binary(), "-V"], capture_output=True, text=True,
                                 timeout=10).stderr
        except (OSError, subprocess.SubprocessError):
            return False
        return None if "--with-stream " in out + " " and "stream=dynamic" not in out else False

    @staticmethod
    def config(handle: dict, *, targets: list[str], tls: bool, peer_cert_file: str | None,
               listens: list[str], load_module: str | None, pid_file: str,
               options: GatewayOptions, single_process: bool = False) -> str:
        server = handle["role"] == "PROD"
        extra = []
        if handle["rate"]:
            # nginx limits each connection; the stream's rate is split evenly.
            per_conn = max(1, handle["rate"] * 1000 // 8 // len(listens))
            extra += [f"proxy_download_rate {per_conn};", f"proxy_upload_rate {per_conn};"]
        if tls and server:
            extra += [
                "ssl_certificate cert.pem;", "ssl_certificate_key key.pem;",
                "ssl_protocols TLSv1.3;",
                "# The peer's certificate is the only trust anchor (pinning).",
                f"ssl_client_certificate {peer_cert_file};", "ssl_verify_client on;",
                "ssl_session_tickets off;",
                "# Unauthenticated clients hold a connection of the cap this long at most.",
                f"ssl_handshake_timeout {options.handshake_timeout_s}s;",
            ]
        elif tls:
            extra += [
                "proxy_ssl on;", "proxy_ssl_certificate cert.pem;",
                "proxy_ssl_certificate_key key.pem;", "proxy_ssl_protocols TLSv1.3;",
                "# The peer's certificate is the only trust anchor (pinning); nginx also",
                "# checks a name: the pinned certificate's own.",
                f"proxy_ssl_trusted_certificate {peer_cert_file};", "proxy_ssl_verify on;",
                f"proxy_ssl_name \"{handle.get('peer_name')}\";",
                "proxy_ssl_session_reuse off;",
            ]
        servers = "".join(
            render_template("nginx-server.conf", listen=listen,
                            listen_ssl=" ssl" if tls and server else "",
                            target=targets[index % len(targets)],
                            extra="".join(f"        {line}\n" for line in extra))
            for index, listen in enumerate(listens))
        # One process in a container: the engine supervises it, and a master started as
        # root would need CAP_SETUID/CAP_SETGID to hand its worker to another user.
        process_model = "master_process off;" if single_process else "worker_processes 1;"
        return render_template("nginx.conf", servers=servers, pid_file=pid_file,
                               process_model=process_model,
                               max_conn=conn_cap(options.conn_per_listener, len(listens)),
                               load_module=f"load_module {load_module};" if load_module else "")

    def render(self, stream_dir, handle, *, targets, tls, peer_cert_file):
        if tls:
            _ssl_files(stream_dir, tls)
            handle = {**handle, "peer_name": peer_common_name(stream_dir / peer_cert_file)}
        module = NGINX_STREAM_MODULE if self._stream_module() else None
        text = self.config(handle, targets=targets, tls=tls, peer_cert_file=peer_cert_file,
                           listens=handle["listeners"], load_module=module, pid_file="nginx.pid",
                           options=self.options)
        write_private(stream_dir / "nginx.conf", text.encode())
        count = len(handle["listeners"])
        return {"argv": [self.binary(), "-p", f"{stream_dir}/", "-c", "nginx.conf", "-e", "stderr"],
                # nginx adopts inherited listening sockets named here (its upgrade path)
                # and matches them to `listen` by address.
                "env": {"PATH": "/usr/bin:/bin",
                        "NGINX": "".join(f"{3 + i};" for i in range(count))},
                "ready": {"kind": "epoll"}}


def peer_common_name(path: Path) -> str:
    """The common name of a pinned certificate (our own per-stream ones carry no quotes)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    if not name or any(c in name for c in "\"\\;{}\n\r$'"):
        raise ProxyError("the peer certificate's name cannot be carried into an nginx config")
    return name

