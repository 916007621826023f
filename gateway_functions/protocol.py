"""The wire contract as types: one pydantic model per request and reply, stream states.

Client and gateway share these. A request is checked field by field in the model's
field order, and the first bad field is a ``BAD_FORMAT`` with the message users have
always seen: every check raises :class:`BadFormat` itself, so no pydantic error text
reaches a user. Nothing from a request reaches a proxy config, a path or a process
without passing here: uids are canonical UUIDs, addresses ``host:port`` with a plain
host name or IP literal, numbers bounded integers, unknown fields refused.

``python -m scistream_gateway.protocol --schema docs/wire.md`` writes the contract's
JSON Schema into that page between its markers.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from scistream_gateway.errors import BadFormat
from scistream_proxy.addresses import format_address

__all__ = ["FUNCTIONS", "ROLES", "Function", "State", "check_host", "format_address",
           "parse_address"]

MAX_WAIT_HELLO_S = 20.0  # one long-poll; the client loops until its own timeout
MAX_RATE_KBPS = 10**9  # 1 Tbit/s: anything above is a typo, not a request
MAX_NUM_CONN = 65535  # above this a num_conn is malformed; above max_num_conn, refused
MAX_CERT_PEM = 8192
MAX_KEY_CHARS = 512  # a hello key, a control secret, an owner token
MAX_LISTED = 1000  # streams one list_streams reply carries at most
ROLES = ("PROD", "CONS")


class State(enum.StrEnum):
    """A stream's state, as the wire and the gateway's SQLite rows spell it."""

    STARTING = "STARTING"  # a reserve in progress: row and ports recorded, proxy starting
    RESERVED = "RESERVED"
    HELLO = "HELLO"
    CONNECTED = "CONNECTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"

    # Named sets (assigned below): ACTIVE streams are not ended (a FAILED one keeps
    # its files until released); HOLDING rows may hold ports and a proxy; LIVE streams
    # may own a running proxy; AWAITING_HELLO ones have no producer's hello yet.
    ACTIVE: ClassVar[frozenset[State]]
    HOLDING: ClassVar[frozenset[State]]
    LIVE: ClassVar[frozenset[State]]
    AWAITING_HELLO: ClassVar[frozenset[State]]


State.ACTIVE = frozenset({State.RESERVED, State.HELLO, State.CONNECTED, State.FAILED})
State.HOLDING = State.ACTIVE | {State.STARTING}
State.LIVE = frozenset({State.STARTING, State.RESERVED, State.HELLO, State.CONNECTED})
State.AWAITING_HELLO = frozenset({State.STARTING, State.RESERVED})

# -- field checks -------------------------------------------------------------------
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UID_EXAMPLE = "0b5c4a1e-5f8a-4c1e-9d43-2f1f6ad2c7a1"


def check_host(host: object) -> bool:
    """True for an IP literal or a DNS host name (nothing else can reach a config)."""
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None


def parse_address(text: object, field: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:port"``) to ``(host, port)``."""
    if not isinstance(text, str) or len(text) > 300:
        raise BadFormat(f"{field}: expected a 'host:port' string")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise BadFormat(f"{field}: brackets are only for IPv6 addresses: {text!r}")
    elif ":" in host:
        raise BadFormat(f"{field}: write IPv6 addresses as [addr]:port: {text!r}")
    if not sep or not check_host(host):
        raise BadFormat(f"{field}: {text!r} is not 'host:port' with a host name or IP address")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadFormat(f"{field}: port of {text!r} must be 1-65535")
    return host, int(port)


def is_canonical_uid(value: object) -> bool:
    """A lowercase canonical UUID, the only spelling of a uid anything accepts."""
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def addresses(value: object, field: str, max_items: int) -> list[str]:
    """A non-empty list of ``host:port`` strings, normalized."""
    if not isinstance(value, list) or not 1 <= len(value) <= max_items:
        raise BadFormat(f"{field} must be a list of 1-{max_items} 'host:port' strings")
    return [format_address(*parse_address(item, field)) for item in value]


Bound = int | float | str  # a number, or the name of a gateway setting (context)


def _bound(bound: Bound, info: ValidationInfo) -> int | float:
    if isinstance(bound, str):
        return getattr((info.context or {})["settings"], bound)
    return bound


def _checked(check: Callable[[Any, str, ValidationInfo], Any], schema: dict) -> Any:
    """A field whose value ``check(value, field, info)`` returns or refuses."""
    return Annotated[Any, PlainValidator(lambda v, info: check(v, info.field_name, info)),
                     WithJsonSchema(schema)]


def _uid(value: object, field: str, info: ValidationInfo) -> str:
    if not is_canonical_uid(value):
        raise BadFormat(f"uid must be a lowercase canonical UUID such as '{_UID_EXAMPLE}'")
    return value


def _role(value: object, field: str, info: ValidationInfo) -> str:
    if value not in ROLES:
        raise BadFormat(f"role must be one of {list(ROLES)}")
    return value


def _integer(low: int, high: Bound) -> Any:
    def check(value: object, field: str, info: ValidationInfo) -> int:
        top = _bound(high, info)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise BadFormat(f"{field} must be an integer in [{low}, {top}]")
        return value
    limits = {"maximum": high} if not isinstance(high, str) else {}
    return _checked(check, {"type": "integer", "minimum": low, **limits})


def _number(low: float, high: float) -> Any:
    def check(value: object, field: str, info: ValidationInfo) -> float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not low <= value <= high:
            raise BadFormat(f"{field} must be a number in [{low}, {high}]")
        return float(value)
    return _checked(check, {"type": "number", "minimum": low, "maximum": high})


def _hex64(value: object, field: str, info: ValidationInfo) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise BadFormat(f"{field} must be 64 lowercase hex digits (a SHA-256)")
    return value


def _text(max_len: int) -> Callable[[Any, str, ValidationInfo], str]:
    def check(value: object, field: str, info: ValidationInfo) -> str:
        if not isinstance(value, str) or not 0 < len(value) <= max_len:
            raise BadFormat(f"{field} must be a string of 1-{max_len} characters")
        return value
    return check


def _boolean(value: object, field: str, info: ValidationInfo) -> bool:
    if not isinstance(value, bool):
        raise BadFormat(f"{field} must be true or false")
    return value


def _addresses(max_items: Bound) -> Any:
    def check(value: object, field: str, info: ValidationInfo) -> list[str]:
        return addresses(value, field, _bound(max_items, info))
    return _checked(check, _ADDRESS_LIST)


def _unchecked(value: object, field: str, info: ValidationInfo) -> object:
    return value  # checked later, where what it must be is known (see its model)


_ADDRESS_LIST = {"type": "array", "minItems": 1,
                 "items": {"type": "string", "description": "host:port ([addr]:port for IPv6)"}}
Uid = _checked(_uid, {"type": "string", "format": "uuid",
                      "description": "lowercase canonical UUID"})
Role = _checked(_role, {"enum": list(ROLES)})
_HEX64_SCHEMA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
Hex64 = _checked(_hex64, _HEX64_SCHEMA)
Boolean = _checked(_boolean, {"type": "boolean"})
_SECRET_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS}
Secret = _checked(_text(MAX_KEY_CHARS), _SECRET_SCHEMA)


def _proof(value: object, field: str, info: ValidationInfo) -> str | None:
    return None if value is None else _text(MAX_KEY_CHARS)(value, field, info)


# A stream's control secret: required, but a request without it (or with null) is
# parsed with None, so the gateway answers AUTH_ERROR ("not proven") where it would
# answer a wrong one, after finding the stream: the uid alone gets nothing else.
Control = _checked(_proof, _SECRET_SCHEMA)


# -- requests -----------------------------------------------------------------------
class Request(BaseModel):
    """A request: a JSON object with the fields below, none other."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # A field that proves the caller's right (see Control): missing, it is None.
    PROOF: ClassVar[str | None] = None

    @classmethod
    def parse(cls, raw: object, settings: object = None) -> Request:
        """The request ``raw`` checked against this model and the gateway's ``settings``
        (bounds such as ``max_lease_s``); a refusal is :class:`BadFormat`."""
        if not isinstance(raw, dict):
            raise BadFormat(f"request must be a JSON object, got {type(raw).__name__}")
        fields = cls.model_fields
        unknown = set(raw) - set(fields)
        if unknown:
            names = sorted(str(k)[:40] for k in unknown)
            raise BadFormat(f"unknown fields {names}; this function takes {sorted(fields)}")
        if cls.PROOF is not None and cls.PROOF not in raw:
            raw = {**raw, cls.PROOF: None}
        missing = [name for name, f in fields.items() if f.is_required() and name not in raw]
        if missing:
            raise BadFormat(f"missing fields {missing}")
        try:
            return cls.model_validate(raw, context={"settings": settings})
        except ValidationError as exc:  # a bug in a model; its text stays on the gateway
            raise BadFormat(f"malformed request ({exc.error_count()} errors)") from None


class GatewayInfoRequest(Request):
    pass


class ReserveRequest(Request):
    uid: Uid
    role: Role
    num_conn: _integer(1, MAX_NUM_CONN)
    rate: _integer(0, MAX_RATE_KBPS) = 0  # kbit/s; 0: unlimited
    key_sha256: Hex64
    control_sha256: Hex64  # SHA-256 of the stream's control secret (every later call)
    owner_sha256: Hex64  # SHA-256 of the owner token (list_streams)
    lease_s: _integer(1, "max_lease_s") = None  # None: the gateway's default_lease_s


class HelloRequest(Request):
    uid: Uid
    role: Role
    key: Secret  # the hello key: the app controller's proof, not the control secret
    # PROD only; its length bound is the stream's num_conn, so the gateway checks it
    # (with :func:`addresses`) once it has found the stream and the key is proven.
    app_listeners: _checked(_unchecked, _ADDRESS_LIST) = None


class WaitHelloRequest(Request):
    PROOF = "control"
    uid: Uid
    control: Control
    timeout_s: _number(0, MAX_WAIT_HELLO_S) = 10.0


class FoldedHello(NamedTuple):
    """The producer's hello carried by its ``connect``: ``hello``'s key and app_listeners."""

    key: str
    app_listeners: object  # checked as hello checks it, once the stream is known


def _folded_hello(value: object, field: str, info: ValidationInfo) -> FoldedHello:
    if not isinstance(value, dict) or set(value) != {"key", "app_listeners"}:
        raise BadFormat(f"{field} must be an object with exactly the fields key and "
                        "app_listeners (the producer's hello)")
    return FoldedHello(_text(MAX_KEY_CHARS)(value["key"], f"{field}.key", info),
                       value["app_listeners"])


class ConnectRequest(Request):
    PROOF = "control"
    uid: Uid
    control: Control
    tls: Boolean = True  # false turns encryption off and must be asked for by name
    remote_listeners: _addresses("max_num_conn")
    # Needed (and checked) only with TLS: see _peer below.
    peer_fingerprint: _checked(_unchecked, _HEX64_SCHEMA) = None
    peer_certificate: _checked(_unchecked, {"type": "string", "minLength": 1,
                                            "maxLength": MAX_CERT_PEM}) = None
    # The producer's hello, folded in (a PROD stream only): reserve -> connect, no
    # round trip of its own. Checked as ``hello`` checks it, after the control secret.
    hello: _checked(_folded_hello, {
        "type": "object", "additionalProperties": False, "required": ["key", "app_listeners"],
        "properties": {"key": _SECRET_SCHEMA, "app_listeners": _ADDRESS_LIST}}) = None

    @model_validator(mode="after")
    def _peer(self) -> ConnectRequest:
        if self.tls:
            if not {"peer_fingerprint", "peer_certificate"} <= self.model_fields_set:
                raise BadFormat("TLS needs peer_fingerprint and peer_certificate"
                                " (or tls: false, asked for by name)")
            _hex64(self.peer_fingerprint, "peer_fingerprint", None)
            _text(MAX_CERT_PEM)(self.peer_certificate, "peer_certificate", None)
        return self


class StreamRequest(Request):
    """``status`` and ``release``: a stream, and the proof of its control secret."""

    PROOF = "control"
    uid: Uid
    control: Control


class RenewRequest(Request):
    PROOF = "control"
    uid: Uid
    control: Control
    lease_s: _integer(1, "max_lease_s") = None  # None: the gateway's default_lease_s


class ListStreamsRequest(Request):
    owner: Secret


# -- replies ------------------------------------------------------------------------
class Reply(BaseModel):
    """A reply: the gateway builds one of these; on the wire it is its JSON object."""

    model_config = ConfigDict(extra="forbid")

    def wire(self) -> dict:
        """The JSON object sent back (optional fields only where the gateway set them)."""
        return self.model_dump(mode="json", exclude_unset=True)


class BackendInfo(BaseModel):
    available: bool
    reason: str | None


class GatewayInfoReply(Reply):
    name: str
    version: str
    backend: str
    backends: dict[str, BackendInfo]
    lan_address: str
    wan_address: str  # where the WAN listeners are bound
    wan_advertise_address: str  # what a producer's listeners say (behind NAT)
    port_range: list[int]
    free_ports: int
    max_num_conn: int
    rate_capacity: int
    rate_in_use: int
    active_streams: int
    proxy_launch: dict[str, Any]
    warnings: list[str]


class ReserveReply(Reply):
    uid: str
    role: str
    listeners: list[str]
    cert_fingerprint: str
    certificate: str
    lease_expires: float


class HelloReply(Reply):
    uid: str
    role: str
    listeners: list[str]


class WaitHelloReply(Reply):
    uid: str
    state: State
    app_listeners: list[str]


class ConnectReply(Reply):
    uid: str
    state: State
    listeners: list[str]
    backend: str


class StatusReply(Reply):
    uid: str
    role: str
    state: State
    alive: bool
    bytes: dict[str, Any] | None
    lease_expires: float
    listeners: list[str]
    detail: str
    connections: dict[str, Any] | None = None
    pid: int | None = None
    proxy_detail: str | None = None
    last_error: str | None = None
    error_code: str | None = None  # CONN_ERROR: the stream failed, or its connections did


class RenewReply(Reply):
    uid: str
    lease_expires: float


class ReleaseReply(Reply):
    uid: str
    released: bool  # true also when the stream was already gone


class StreamSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uid: str
    role: str
    state: State
    created: float
    lease_expires: float
    bytes: dict[str, Any] | None  # as status gives it; null: the proxy is not running


class ListStreamsReply(Reply):
    streams: list[StreamSummary]  # newest first, at most MAX_LISTED


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorReply(Reply):
    """What any function returns for an expected failure (see scistream_gateway.errors)."""

    error: ErrorDetail


# -- the functions ------------------------------------------------------------------
class Function(NamedTuple):
    request: type[Request]
    reply: type[Reply]


FUNCTIONS: dict[str, Function] = {
    "gateway_info": Function(GatewayInfoRequest, GatewayInfoReply),
    "reserve": Function(ReserveRequest, ReserveReply),
    "hello": Function(HelloRequest, HelloReply),
    "wait_hello": Function(WaitHelloRequest, WaitHelloReply),
    "connect": Function(ConnectRequest, ConnectReply),
    "status": Function(StreamRequest, StatusReply),
    "renew": Function(RenewRequest, RenewReply),
    "release": Function(StreamRequest, ReleaseReply),
    "list_streams": Function(ListStreamsRequest, ListStreamsReply),
}
"""Every gateway function by name, with its request and reply: the one table the
client, the wire layer and the workers use."""


# -- the schema in the docs -----------------------------------------------------------
SCHEMA_BEGIN = "<!-- wire-schema: begin (python -m scistream_gateway.protocol --schema) -->"
SCHEMA_END = "<!-- wire-schema: end -->"


def schema() -> dict:
    """The JSON Schema of every request and reply, by function name."""
    return {
        "functions": {name: {"request": f.request.model_json_schema(),
                             "reply": f.reply.model_json_schema()}
                      for name, f in FUNCTIONS.items()},
        "error": ErrorReply.model_json_schema(),
    }


def schema_section() -> str:
    """The text between the markers of the wire page."""
    return f"{SCHEMA_BEGIN}\n```json\n{json.dumps(schema(), indent=2)}\n```\n{SCHEMA_END}"


def write_schema(page: Path) -> bool:
    """Put :func:`schema_section` into ``page`` between its markers; True if it changed."""
    text = page.read_text()
    start, end = text.index(SCHEMA_BEGIN), text.index(SCHEMA_END) + len(SCHEMA_END)
    new = text[:start] + schema_section() + text[end:]
    page.write_text(new)
    return new != text


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--schema":
        print("usage: python -m scistream_gateway.protocol --schema docs/wire.md",
              file=sys.stderr)
        return 2
    changed = write_schema(Path(argv[1]))
    print(f"{argv[1]}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
