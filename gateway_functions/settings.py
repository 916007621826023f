"""Gateway settings: the TOML file named by ``SCISTREAM_GATEWAY_CONFIG``.

The operator owns these; a caller never chooses the gateway's addresses or ports.
Example (every key but ``name`` and ``state_dir`` has the default shown)::

    [gateway]
    name = "facility-p-gw"
    state_dir = "/var/lib/scistream"     # SQLite state, per-stream keys and configs
    lan_address = "127.0.0.1"            # where this facility's apps reach the proxy
    wan_address = "127.0.0.1"            # where the peer gateway reaches the proxy
    port_range = [50000, 50999]          # inclusive; one port per connection
    max_num_conn = 64                    # per stream
    rate_capacity = 0                    # kbit/s summed over active streams; 0 = unlimited
    backend = "native"                   # native, stunnel, haproxy, nginx,
                                         # haproxy-docker, nginx-docker (docs/backends.md)
    default_lease_s = 3600
    max_lease_s = 86400
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from scistream_gateway.errors import ServerError
from scistream_gateway.validation import check_host

__all__ = ["CONFIG_ENV", "GatewaySettings", "load_settings"]

CONFIG_ENV = "SCISTREAM_GATEWAY_CONFIG"


@dataclass(frozen=True)
class GatewaySettings:
    name: str
    state_dir: Path
    lan_address: str = "127.0.0.1"
    wan_address: str = "127.0.0.1"
    port_min: int = 50000
    port_max: int = 50999
    max_num_conn: int = 64
    rate_capacity: int = 0
    backend: str = "native"
    default_lease_s: int = 3600
    max_lease_s: int = 86400

    @classmethod
    def from_toml(cls, path: Path) -> GatewaySettings:
        """Read and check a settings file; a broken file is a ``SERVER_ERR`` naming the key."""
        try:
            table = tomllib.loads(Path(path).read_text()).get("gateway")
        except (OSError, ValueError) as exc:  # TOMLDecodeError is a ValueError; so is a NUL
            raise ServerError(f"gateway settings {path}: {exc}") from None
        if not isinstance(table, dict):
            raise ServerError(f"gateway settings {path}: no [gateway] table")
        known = {f for f in cls.__dataclass_fields__} - {"port_min", "port_max"} | {"port_range"}
        unknown = set(table) - known
        if unknown:
            raise ServerError(f"gateway settings {path}: unknown keys {sorted(unknown)}")
        values = dict(table)
        try:
            if "port_range" in values:
                values["port_min"], values["port_max"] = (int(p) for p in values.pop("port_range"))
            values["state_dir"] = Path(values["state_dir"]).expanduser()
            settings = cls(**values)
        except KeyError as exc:
            raise ServerError(f"gateway settings {path}: missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ServerError(f"gateway settings {path}: {exc}") from None
        settings._check(path)
        return settings

    def _check(self, path: Path) -> None:
        problems = []
        if not (1024 <= self.port_min <= self.port_max <= 65535):
            problems.append("port_range must be [low, high] with 1024 <= low <= high <= 65535")
        for key in ("lan_address", "wan_address"):
            if not check_host(getattr(self, key)):
                problems.append(f"{key} is not a host name or IP address")
        for key in ("max_num_conn", "default_lease_s", "max_lease_s"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                problems.append(f"{key} must be a positive integer")
        from scistream_proxy.backends import BACKENDS

        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {sorted(BACKENDS)}")
        if not isinstance(self.rate_capacity, int) or self.rate_capacity < 0:
            problems.append("rate_capacity must be an integer >= 0")
        if problems:
            raise ServerError(f"gateway settings {path}: " + "; ".join(problems))

    def to_toml(self) -> str:
        """The settings as a TOML document that :meth:`from_toml` reads back."""
        lines = ["[gateway]"]
        for key, value in (
            ("name", self.name), ("state_dir", str(self.state_dir)),
            ("lan_address", self.lan_address), ("wan_address", self.wan_address),
            ("port_range", [self.port_min, self.port_max]),
            ("max_num_conn", self.max_num_conn), ("rate_capacity", self.rate_capacity),
            ("backend", self.backend), ("default_lease_s", self.default_lease_s),
            ("max_lease_s", self.max_lease_s),
        ):
            # JSON strings and integer arrays are valid TOML values.
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def load_settings() -> GatewaySettings:
    """The settings of this gateway, from the file named by ``SCISTREAM_GATEWAY_CONFIG``."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ServerError(f"{CONFIG_ENV} is not set: the gateway does not know its settings")
    return GatewaySettings.from_toml(Path(path))
