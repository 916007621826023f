"""Gateway settings: the TOML file named by ``SCISTREAM_GATEWAY_CONFIG``.

The operator owns these; a caller never chooses the gateway's addresses or ports.
Example (every key but ``name`` and ``state_dir`` has the default shown)::

    [gateway]
    name = "facility-p-gw"
    state_dir = "/var/lib/scistream"     # SQLite state, per-stream keys and configs
    lan_address = "127.0.0.1"            # where this facility's apps reach the proxy
    wan_address = "127.0.0.1"            # where the WAN listeners are bound
    wan_advertise_address = ""           # what peers dial (behind NAT); "" = wan_address
    port_range = [50000, 50999]          # inclusive; one port per connection
    max_num_conn = 64                    # per stream
    rate_capacity = 0                    # kbit/s summed over active streams; 0 = unlimited
    backend = "native"                   # native, stunnel, haproxy, nginx,
                                         # haproxy-docker, nginx-docker (docs/backends.md)
    default_lease_s = 3600
    max_lease_s = 86400
    allow_plain_tcp = false              # true: a connect may ask for tls = false
    shared = false                       # true: a multi-user endpoint's gateway
    docker_host = ""                     # container engine (see below); "" = not named
    container_pids_limit = 256           # per container (container backends)
    container_memory_mib = 512           # per container (container backends)
    handshake_timeout_s = 5              # an inbound TLS handshake, as a whole (native)
    max_pending_handshakes = 64          # unauthenticated, per relay; a stream: a quarter
    conn_per_listener = 4                # a stream's connections: this x num_conn, >= 16

The container backends reach ``docker_host`` when named (a ``unix://`` socket), else
``DOCKER_HOST``, else the Docker SDK's standard socket. A shared gateway refuses them
unless ``docker_host`` names a socket owned by the gateway's own user (a rootless
engine): whoever reaches an engine controls every container on it.

Behind NAT, the WAN listeners are bound on ``wan_address`` (this node's own address)
and ``reserve`` advertises ``wan_advertise_address`` (the address the NAT exposes, with
the same ports forwarded) in a producer's ``listeners``; read back, an empty one is
``wan_address``. Any address may be an IPv6 literal (``"2001:db8::1"``, no brackets).

``allow_plain_tcp`` lets a stream's owner turn encryption off between the gateways
(``connect`` with ``tls: false``); off, such a request is ``NOT_IMPLEMENTED``.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator

from scistream_gateway.errors import ServerError
from scistream_gateway.protocol import check_host

if TYPE_CHECKING:
    from scistream_proxy.backends import GatewayOptions

__all__ = ["CONFIG_ENV", "GatewaySettings", "load_settings"]

CONFIG_ENV = "SCISTREAM_GATEWAY_CONFIG"

# What a user reads about a key whose value has the wrong type (pydantic's own words
# stay out of messages).
_PROBLEMS = {
    "name": "name must be a string",
    "state_dir": "state_dir must be a path",
    "port_min": "port_range must be [low, high] with 1024 <= low <= high <= 65535",
    "port_max": "port_range must be [low, high] with 1024 <= low <= high <= 65535",
    "lan_address": "lan_address is not a host name or IP address",
    "wan_address": "wan_address is not a host name or IP address",
    "wan_advertise_address": "wan_advertise_address is not a host name or IP address "
                             "(or \"\": the wan_address)",
    "max_num_conn": "max_num_conn must be a positive integer",
    "default_lease_s": "default_lease_s must be a positive integer",
    "max_lease_s": "max_lease_s must be a positive integer",
    "rate_capacity": "rate_capacity must be an integer >= 0",
    "backend": "backend must be a string",
    "shared": "shared must be true or false",
    "allow_plain_tcp": "allow_plain_tcp must be true or false",
    "docker_host": "docker_host must be \"\" or unix:// and an absolute path",
    "container_pids_limit": "container_pids_limit must be an integer >= 16",
    "container_memory_mib": "container_memory_mib must be an integer >= 32",
    "handshake_timeout_s": "handshake_timeout_s must be a positive integer",
    "max_pending_handshakes": "max_pending_handshakes must be an integer >= 4",
    "conn_per_listener": "conn_per_listener must be a positive integer",
}


class GatewaySettings(BaseModel):
    """One gateway's settings; refuses unknown keys and bad values (``SERVER_ERR``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    state_dir: Path
    lan_address: str = "127.0.0.1"
    wan_address: str = "127.0.0.1"
    wan_advertise_address: str = ""  # what peers dial, behind NAT; "" (default): wan_address
    port_min: int = 50000
    port_max: int = 50999
    max_num_conn: int = 64
    rate_capacity: int = 0  # kbit/s summed over active streams; 0 = unlimited
    backend: str = "native"
    default_lease_s: int = 3600
    max_lease_s: int = 86400
    allow_plain_tcp: bool = False  # connect may turn encryption off between gateways
    shared: bool = False  # several Unix users' gateways on this node (multi-user endpoint)
    docker_host: str = ""  # the container engine, "unix:///path"; "" = not named
    container_pids_limit: int = 256
    container_memory_mib: int = 512
    # Bounds of the native relay's WAN side (docs/native.md, "Under a flood").
    handshake_timeout_s: int = 5
    max_pending_handshakes: int = 64
    conn_per_listener: int = 4

    @classmethod
    def from_toml(cls, path: Path) -> GatewaySettings:
        """Read and check a settings file; a broken file is a ``SERVER_ERR`` naming the key."""
        try:
            table = tomllib.loads(Path(path).read_text()).get("gateway")
        except (OSError, ValueError) as exc:  # TOMLDecodeError is a ValueError; so is a NUL
            raise ServerError(f"gateway settings {path}: {exc}") from None
        if not isinstance(table, dict):
            raise ServerError(f"gateway settings {path}: no [gateway] table")
        known = set(cls.model_fields) - {"port_min", "port_max"} | {"port_range"}
        unknown = set(table) - known
        if unknown:
            raise ServerError(f"gateway settings {path}: unknown keys {sorted(unknown)}")
        values = dict(table)
        try:
            if "port_range" in values:
                values["port_min"], values["port_max"] = (int(p) for p in values.pop("port_range"))
            values["state_dir"] = Path(values["state_dir"]).expanduser()
        except KeyError as exc:
            raise ServerError(f"gateway settings {path}: missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ServerError(f"gateway settings {path}: {exc}") from None
        return cls.model_validate(values, context={"path": path})

    @model_validator(mode="wrap")
    @classmethod
    def _check(cls, values: object, handler, info: ValidationInfo) -> GatewaySettings:
        where = f"gateway settings {(info.context or {}).get('path', '(given)')}"
        # Not given (or ""): peers dial the address the listeners are bound on.
        advertise_given = isinstance(values, dict) and values.get("wan_advertise_address")
        if isinstance(values, dict) and not advertise_given:
            values = {**values, "wan_advertise_address": values.get(
                "wan_address", cls.model_fields["wan_address"].default)}
        try:
            settings = handler(values)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                key = str(error["loc"][0]) if error["loc"] else ""
                if key == "wan_advertise_address" and not advertise_given:
                    continue  # the wan_address's own problem
                if error["type"] == "missing":
                    raise ServerError(f"{where}: missing key '{key}'") from None
                problem = _PROBLEMS.get(key, f"unknown keys {[key]}")
                if problem not in problems:
                    problems.append(problem)
            raise ServerError(f"{where}: " + "; ".join(problems)) from None
        problems = settings._problems()
        if problems:
            raise ServerError(f"{where}: " + "; ".join(problems))
        return settings

    def _problems(self) -> list[str]:
        problems = []
        if not (1024 <= self.port_min <= self.port_max <= 65535):
            problems.append(_PROBLEMS["port_min"])
        for key in ("lan_address", "wan_address"):
            if not check_host(getattr(self, key)):
                problems.append(_PROBLEMS[key])
        if self.wan_advertise_address != self.wan_address and not check_host(
                self.wan_advertise_address):
            problems.append(_PROBLEMS["wan_advertise_address"])
        for key in ("max_num_conn", "default_lease_s", "max_lease_s"):
            if getattr(self, key) < 1:
                problems.append(_PROBLEMS[key])
        if self.rate_capacity < 0:
            problems.append(_PROBLEMS["rate_capacity"])
        if self.docker_host and not (self.docker_host.startswith("unix:///")
                                     and "\0" not in self.docker_host):
            problems.append(_PROBLEMS["docker_host"])
        if self.container_pids_limit < 16:
            problems.append(_PROBLEMS["container_pids_limit"])
        if self.container_memory_mib < 32:
            problems.append(_PROBLEMS["container_memory_mib"])
        for key, least in (("handshake_timeout_s", 1), ("max_pending_handshakes", 4),
                           ("conn_per_listener", 1)):
            if getattr(self, key) < least:
                problems.append(_PROBLEMS[key])
        from scistream_proxy.backends import BACKENDS, get_backend

        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {sorted(BACKENDS)}")
        elif not problems:
            refusal = get_backend(self.backend, self.backend_options()).refusal()
            if refusal:
                problems.append(f"backend {self.backend}: {refusal}")
        return problems

    def backend_options(self) -> GatewayOptions:
        """What these settings tell the proxy backends."""
        from scistream_proxy.backends import GatewayOptions

        return GatewayOptions(shared=self.shared, docker_host=self.docker_host,
                              pids_limit=self.container_pids_limit,
                              memory_mib=self.container_memory_mib,
                              handshake_timeout_s=self.handshake_timeout_s,
                              max_pending_handshakes=self.max_pending_handshakes,
                              conn_per_listener=self.conn_per_listener)

    def make_state_dir(self) -> Path:
        """Create the state directory (mode 0700, parents as needed) if it is missing;
        returns it. It holds every stream's keys, so it must be this user's alone: one
        owned by someone else is refused (``SERVER_ERR``), a looser mode tightened."""
        directory = self.state_dir
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
        except OSError as exc:
            raise ServerError(f"gateway state_dir {directory}: {exc.strerror}") from None
        if info.st_uid != os.getuid():
            raise ServerError(f"gateway state_dir {directory} belongs to uid {info.st_uid}, "
                              f"not to uid {os.getuid()} that runs this gateway's functions")
        if info.st_mode & 0o077:
            os.chmod(directory, 0o700)
        return directory

    def log(self, entry: str) -> None:
        """Append ``entry`` to ``<state_dir>/gateway.log``, the operator's log (bug
        reports, recovery); never fails a call."""
        try:
            fd = os.open(self.state_dir / "gateway.log",
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with open(fd, "a") as fh:
                fh.write(f"{entry}\n")
        except OSError:
            pass

    def to_toml(self) -> str:
        """The settings as a TOML document that :meth:`from_toml` reads back."""
        lines = ["[gateway]"]
        for key, value in (
            ("name", self.name), ("state_dir", str(self.state_dir)),
            ("lan_address", self.lan_address), ("wan_address", self.wan_address),
            ("wan_advertise_address", self.wan_advertise_address),
            ("port_range", [self.port_min, self.port_max]),
            ("max_num_conn", self.max_num_conn), ("rate_capacity", self.rate_capacity),
            ("backend", self.backend), ("default_lease_s", self.default_lease_s),
            ("max_lease_s", self.max_lease_s), ("allow_plain_tcp", self.allow_plain_tcp),
            ("shared", self.shared),
            ("docker_host", self.docker_host),
            ("container_pids_limit", self.container_pids_limit),
            ("container_memory_mib", self.container_memory_mib),
            ("handshake_timeout_s", self.handshake_timeout_s),
            ("max_pending_handshakes", self.max_pending_handshakes),
            ("conn_per_listener", self.conn_per_listener),
        ):
            # JSON strings, booleans and integer arrays are valid TOML values.
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def load_settings() -> GatewaySettings:
    """The settings of this gateway, from the file named by ``SCISTREAM_GATEWAY_CONFIG``."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ServerError(f"{CONFIG_ENV} is not set: the gateway does not know its settings")
    return GatewaySettings.from_toml(Path(path))
