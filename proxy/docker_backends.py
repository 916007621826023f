"""Container S2DS backends: HAProxy and nginx in Docker, one container per stream end.

Images are built locally by ``python -m scistream_proxy.images build`` (FROM scratch,
from the Debian packages' binaries). The engine is the one the gateway's settings name
(``docker_host``), else ``DOCKER_HOST``, else the Docker SDK's standard socket, never a
default path in /tmp (any local user could create that one first). Whoever reaches an
engine is root in effect and can read any container's files (``docker cp``/``exec``),
so a shared gateway takes only an engine its settings name whose socket its own user
owns: a rootless engine. Each container runs with host networking as the gateway's own
uid:gid, a read-only root, no capabilities, ``no-new-privileges``, pids and memory
limits, a unique name and labels (``org.scistream.uid``, ``org.scistream.gateway``,
...) so leftovers can be found (:func:`leftover_containers`) and removed.

Ports: a container cannot inherit a descriptor, so the stream's sockets are bound with
SO_REUSEPORT at ``reserve`` and the port holder steers the port's reuseport group (a
classic-BPF program) to the second socket that joins it: the container's, which binds
the same address at ``connect`` (same uid, so the kernel lets it join; nobody else can).
Once the container listens, the holder leaves. Connections that reached the port before
the container listened (a peer that connected before ``connect`` returned) are reset
by the holder and logged, unless the kernel migrates them (``net.ipv4.tcp_migrate_req``).

The files the container needs (config, certificate, key, peer certificate) are
bind-mounted read-only one by one from the stream's 0700 directory; ``run/`` (stats
socket, pid file) is the only writable mount.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

from scistream_proxy.backends import (
    DEFAULT_OPTIONS,
    GatewayOptions,
    ProxyError,
    ProxyUnavailable,
)
from scistream_proxy.external import (
    HAProxyBackend,
    HeldPortsBackend,
    NginxBackend,
    _identity,
    _ssl_files,
    haproxy_counters,
    peer_common_name,
    write_haproxy_pem,
)
from scistream_proxy.launch import polled_inodes
from scistream_proxy.addresses import parse_address
from scistream_proxy.process import ProcessIdentity
from scistream_proxy.tls import write_private

__all__ = ["HAProxyDockerBackend", "NginxDockerBackend", "ProxyUnavailable", "docker_client",
           "leftover_containers"]

LABEL = "org.scistream"
CONF_DIR = "/etc/scistream"
RUN_DIR = "/run/scistream"
READY_TIMEOUT_S = 20.0
SHARED_NEEDS_ENGINE = (
    "a shared gateway (shared = true) runs containers only on an engine its settings "
    "name (docker_host) whose socket its own user owns, a rootless engine: whoever "
    "reaches an engine can read every container's files, other users' keys too")


def docker_host(options: GatewayOptions = DEFAULT_OPTIONS) -> str:
    """The engine ``options`` lead to, as shown in messages."""
    return (options.docker_host or os.environ.get("DOCKER_HOST")
            or "the standard socket unix:///var/run/docker.sock")


def engine_refusal(options: GatewayOptions) -> str | None:
    """Why this gateway may not use the engine its options lead to, or None.

    Only a shared gateway refuses: it needs ``docker_host`` naming a unix socket owned
    by its own uid (nobody else can have made it)."""
    if not options.shared:
        return None
    if not options.docker_host:
        return SHARED_NEEDS_ENGINE
    path = options.docker_host.removeprefix("unix://")
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"docker_host {options.docker_host}: {exc.strerror}"
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        return (f"docker_host {options.docker_host} is not a socket owned by uid "
                f"{os.getuid()}: {SHARED_NEEDS_ENGINE}")
    return None


def docker_client(options: GatewayOptions = DEFAULT_OPTIONS, timeout_s: float = 30.0):
    """A Docker SDK client for the engine ``options`` lead to; ProxyUnavailable when this
    gateway may not use it or none answers."""
    refusal = engine_refusal(options)
    if refusal:
        raise ProxyUnavailable(refusal)
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise ProxyUnavailable("the Docker SDK is not installed "
                               "(pip install 'scistream-prefect[docker]')") from None
    try:
        if options.docker_host:
            client = docker.DockerClient(base_url=options.docker_host, timeout=timeout_s)
        else:  # DOCKER_HOST (and its TLS settings), else the standard socket
            client = docker.from_env(timeout=timeout_s)
        client.ping()
    except (DockerException, OSError) as exc:
        raise ProxyUnavailable(f"no Docker engine answers at {docker_host(options)}: "
                               f"{exc}") from None
    return client


def leftover_containers(client, **labels: str) -> list:
    """Containers (running or not) carrying this project's labels with these values."""
    filters = [f"{LABEL}.managed=1"] + [f"{LABEL}.{k}={v}" for k, v in labels.items()]
    # ignore_removed: a container removed between the engine's list and its inspect
    # (another stream's release, another gateway) is not an error.
    return client.containers.list(all=True, filters={"label": filters}, ignore_removed=True)


def _listening_inodes(host: str, port: int) -> set[int]:
    """Inodes of sockets listening on host:port in this network namespace."""
    import ipaddress

    ip = ipaddress.ip_address(host)
    table = "/proc/net/tcp6" if ip.version == 6 else "/proc/net/tcp"
    if ip.version == 4:
        want = f"{int.from_bytes(ip.packed, 'little'):08X}:{port:04X}"
    else:
        words = [int.from_bytes(ip.packed[i:i + 4], "little") for i in range(0, 16, 4)]
        want = "".join(f"{w:08X}" for w in words) + f":{port:04X}"
    found = set()
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            found.add(int(fields[9]))
    return found


def _gateway_user(client) -> str:
    """The container user that is the gateway's own uid:gid on the host. A rootless
    engine maps its container uid 0 to the user that runs it (the gateway's user)."""
    security = client.info().get("SecurityOptions") or []
    if any("name=rootless" in option for option in security):
        return "0:0"
    return f"{os.getuid()}:{os.getgid()}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:40] or "gw"


class ContainerBackend(HeldPortsBackend):
    """One container per stream end; ``image`` is built by ``scistream_proxy.images``."""

    reuseport = True
    image_kind = ""
    counters_detail = "no byte counters"

    @property
    def image(self) -> str:
        from scistream_proxy.images import image_tag

        return image_tag(self.image_kind)

    @property
    def image_missing(self) -> str:
        return f"image {self.image} is missing: build it with " \
               "'python -m scistream_proxy.images build'"

    def refusal(self) -> str | None:
        if self.options.shared and not self.options.docker_host:
            return SHARED_NEEDS_ENGINE
        return None

    def unavailable_reason(self) -> str | None:
        try:
            client = docker_client(self.options, timeout_s=5)
        except ProxyUnavailable as exc:
            return str(exc)
        try:
            from docker.errors import DockerException, ImageNotFound

            try:
                client.images.get(self.image)
            except ImageNotFound:
                return self.image_missing
            except DockerException as exc:
                return f"Docker engine at {docker_host(self.options)}: {exc}"
        finally:
            client.close()
        return None

    def start(self, spec):
        handle = super().start(spec)
        handle["gateway"] = spec.gateway
        return handle

    # -- what each image runs ---------------------------------------------------------
    def files(self, stream_dir: Path, handle: dict, *, targets: list[str], tls: bool,
              peer_cert_file: str | None) -> tuple[list[str], list[str]]:
        """Write the config; return (files to mount read-only, the container's command)."""
        raise NotImplementedError

    def ready_extra(self, stream_dir: Path) -> bool:
        return True

    # -- connect / status / stop --------------------------------------------------------
    def connect(self, handle, stream_dir, *, targets, tls, peer_cert_file, peer_fingerprint):
        if handle.get("container"):
            return handle
        holder = _identity(handle.get("holder"))
        if holder is None or not holder.alive():
            raise ProxyError("the port holder of this stream is gone")
        client = docker_client(self.options)
        try:
            return self._run(client, handle, stream_dir, holder, targets=targets, tls=tls,
                             peer_cert_file=peer_cert_file, peer_fingerprint=peer_fingerprint)
        finally:
            client.close()

    def _run(self, client, handle, stream_dir, holder, *, targets, tls, peer_cert_file,
             peer_fingerprint):
        from docker.errors import DockerException, ImageNotFound
        from docker.types import Mount

        run_dir = stream_dir / "run"
        run_dir.mkdir(mode=0o700, exist_ok=True)
        handle = {**handle, "peer_fp": peer_fingerprint}
        mounted, command = self.files(stream_dir, handle, targets=targets, tls=tls,
                                      peer_cert_file=peer_cert_file)
        mounts = [Mount(f"{CONF_DIR}/{name}", str(stream_dir / name), type="bind", read_only=True)
                  for name in mounted]
        mounts.append(Mount(RUN_DIR, str(run_dir), type="bind", read_only=False))
        name = f"scistream-{_safe_name(handle['gateway'])}-{handle['role'].lower()}-{handle['uid']}"
        labels = {f"{LABEL}.managed": "1", f"{LABEL}.uid": handle["uid"],
                  f"{LABEL}.gateway": handle["gateway"], f"{LABEL}.role": handle["role"],
                  f"{LABEL}.backend": self.name, f"{LABEL}.stream_dir": str(stream_dir)}
        for old in leftover_containers(client, uid=handle["uid"], stream_dir=str(stream_dir)):
            old.remove(force=True)  # a connect that died half-way
        try:
            container = client.containers.run(
                self.image, command, name=name, labels=labels, detach=True,
                network_mode="host", user=_gateway_user(client),
                working_dir=CONF_DIR, mounts=mounts, read_only=True, cap_drop=["ALL"],
                security_opt=["no-new-privileges"], init=False,
                pids_limit=self.options.pids_limit,
                mem_limit=f"{self.options.memory_mib}m",
                memswap_limit=f"{self.options.memory_mib}m",  # no swap beyond it
            )
        except ImageNotFound:
            raise ProxyUnavailable(self.image_missing) from None
        except DockerException as exc:
            raise ProxyError(f"could not start the {self.name} container: {exc}") from None
        record = {"container": container.id, "container_name": name}
        write_private(stream_dir / "container.json", str(container.id).encode())
        try:
            self._wait_ready(container, handle, stream_dir, holder)
        except ProxyError:
            container.remove(force=True)
            (stream_dir / "container.json").unlink(missing_ok=True)
            raise
        self._stop_holder(stream_dir, holder)
        return {**handle, **record, "holder": None, "tls": tls}

    @staticmethod
    def _polls_every_port(pid: int, addresses: list[tuple[str, int]],
                          holder_inodes: set[int]) -> bool:
        """Every port has a listening socket of the container's own (not the holder's)
        in an epoll instance of the container's processes: they accept."""
        if pid <= 0:
            return False
        polled = polled_inodes(pid)
        for host, port in addresses:
            own = _listening_inodes(host, port) - holder_inodes
            if not any(f"socket:[{inode}]" in polled for inode in own):
                return False
        return True

    def _wait_ready(self, container, handle: dict, stream_dir: Path,
                    holder: ProcessIdentity) -> None:
        from docker.errors import DockerException

        holder_inodes = set()
        for fd in Path(f"/proc/{holder.pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                holder_inodes.add(int(link[8:-1]))

        addresses = [parse_address(listener) for listener in handle["listeners"]]
        deadline = time.monotonic() + READY_TIMEOUT_S
        delay = 0.01
        while True:
            try:
                container.reload()
            except DockerException as exc:
                raise ProxyError(f"container vanished: {exc}") from None
            if container.status not in ("created", "running"):
                logs = container.logs(tail=20).decode(errors="replace").strip()
                raise ProxyError(f"{self.name} container {container.status}: {logs}")
            if container.status == "running" and self._polls_every_port(
                    container.attrs["State"].get("Pid") or 0, addresses, holder_inodes) \
                    and self.ready_extra(stream_dir):
                return
            if time.monotonic() >= deadline:
                logs = container.logs(tail=20).decode(errors="replace").strip()
                raise ProxyError(f"{self.name} container not ready within "
                                 f"{READY_TIMEOUT_S} s: {logs}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def status(self, handle, stream_dir):
        if not handle.get("container"):
            return super().status(handle, stream_dir)
        # No engine to ask is not a dead container: ProxyUnavailable, not alive=False.
        client = docker_client(self.options, timeout_s=10)
        from docker.errors import DockerException, NotFound

        try:
            container = client.containers.get(handle["container"])
            state = container.attrs["State"]
        except NotFound:
            return {"alive": False, "bytes": None, "pid": None, "detail": "container is gone"}
        except DockerException as exc:
            raise ProxyUnavailable(f"Docker engine at {docker_host(self.options)}: {exc}") from None
        finally:
            client.close()
        if state.get("Status") != "running":
            detail = f"container {state.get('Status')} (exit code {state.get('ExitCode')})"
            return {"alive": False, "bytes": None, "pid": None, "detail": detail}
        return self.with_counters({"alive": True, "pid": state.get("Pid"),
                                   "container": handle["container"][:12]}, handle, stream_dir)

    def stop(self, handle, stream_dir):
        ids = {handle.get("container")}
        try:
            ids.add((stream_dir / "container.json").read_text().strip())
        except OSError:
            pass
        ids.discard(None)
        ids.discard("")
        if ids or handle.get("holder") is None:
            client = docker_client(self.options)  # a container may run: no engine is an error here
            try:
                from docker.errors import NotFound

                found = leftover_containers(client, uid=handle["uid"],
                                            stream_dir=str(stream_dir))
                for container in found:
                    ids.discard(container.id)
                    container.remove(force=True)
                for container_id in ids:
                    try:
                        client.containers.get(container_id).remove(force=True)
                    except NotFound:
                        pass
            finally:
                client.close()
        holder = _identity(handle.get("holder"))
        if holder is not None:
            self._stop_holder(stream_dir, holder)  # asks it to go, then stops it


    def abandon(self, stream_dir: Path, uid: str) -> None:
        client = docker_client(self.options)  # a container may run: no engine is an error here
        try:
            for container in leftover_containers(client, uid=uid, stream_dir=str(stream_dir)):
                container.remove(force=True)
        finally:
            client.close()
        super().abandon(stream_dir, uid)  # the port holder

    def orphans(self, streams_dir: Path, live: set[str]) -> list[str]:
        from docker.errors import DockerException

        client = docker_client(self.options, timeout_s=10)
        removed = []
        try:
            for container in leftover_containers(client, backend=self.name):
                labels = container.labels
                stream_dir = Path(labels.get(f"{LABEL}.stream_dir", "/"))
                uid = labels.get(f"{LABEL}.uid", "")
                if stream_dir.parent != streams_dir or uid in live:
                    continue  # another gateway's, or a live stream's
                container.remove(force=True)
                removed.append(uid)
        except DockerException as exc:
            raise ProxyUnavailable(f"Docker engine at {docker_host(self.options)}: {exc}") from None
        finally:
            client.close()
        return removed


class HAProxyDockerBackend(ContainerBackend):
    """HAProxy in a container: binds the stream's ports itself (SO_REUSEPORT by default)."""

    name = "haproxy-docker"
    image_kind = "haproxy"
    counters_detail = ""

    def files(self, stream_dir, handle, *, targets, tls, peer_cert_file):
        backend = HAProxyBackend(self.options)  # the gateway's caps, as outside a container
        if tls:
            write_haproxy_pem(stream_dir)
        text = backend.config(handle, targets=targets, tls=tls, peer_cert_file=peer_cert_file,
                              binds=handle["listeners"], stats=f"{RUN_DIR}/haproxy.sock")
        write_private(stream_dir / "haproxy.cfg", text.encode())
        mounted = ["haproxy.cfg"] + (["haproxy.pem", peer_cert_file] if tls else [])
        return mounted, ["-db", "-f", f"{CONF_DIR}/haproxy.cfg"]

    def ready_extra(self, stream_dir):
        try:
            haproxy_counters(stream_dir / "run", "haproxy.sock", "PROD")
        except ProxyError:
            return False
        return True

    def counters(self, handle, stream_dir):
        return haproxy_counters(stream_dir / "run", "haproxy.sock", handle["role"])


class NginxDockerBackend(ContainerBackend):
    """nginx's stream module in a container: ``listen ... reuseport``, per-connection rates."""

    name = "nginx-docker"
    image_kind = "nginx"
    supports_rate = True
    counters_detail = "nginx (open source) exposes no byte counters for streams"

    def files(self, stream_dir, handle, *, targets, tls, peer_cert_file):
        if tls:
            _ssl_files(stream_dir, tls)
            handle = {**handle, "peer_name": peer_common_name(stream_dir / peer_cert_file)}
        text = NginxBackend.config(
            handle, targets=targets, tls=tls, peer_cert_file=peer_cert_file,
            listens=[f"{a} reuseport" for a in handle["listeners"]],
            load_module="/usr/lib/nginx/modules/ngx_stream_module.so",
            pid_file=f"{RUN_DIR}/nginx.pid", options=self.options, single_process=True,
        )
        write_private(stream_dir / "nginx.conf", text.encode())
        mounted = ["nginx.conf"] + (["cert.pem", "key.pem", peer_cert_file] if tls else [])
        return mounted, ["-p", f"{CONF_DIR}/", "-c", "nginx.conf", "-e", "stderr"]
