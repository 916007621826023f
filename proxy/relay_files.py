"""Names the native relay and its backend share: the relay's files and the limits of its
control socket (apart from both, so the gateway's side never imports the relay)."""

from __future__ import annotations

from pathlib import Path

CONTROL_SOCKET = "relay.sock"
LOCK_FILE = "relay.lock"
LOG_FILE = "relay.log"
CONFIG_FILE = "proxy.json"
RELAY_DIR = "relay"
# At most this many descriptors per SCM_RIGHTS message (the kernel's SCM_MAX_FD is 253).
FDS_PER_MESSAGE = 250
# The relay's own OpenSSL configuration, set as OPENSSL_CONF when it is started (it must
# be set before OpenSSL initialises): TLS 1.3 suites in the order AES-128-GCM,
# AES-256-GCM, ChaCha20. AES-128-GCM is a mandatory TLS 1.3 suite and is cheaper than
# OpenSSL's default first choice, AES-256-GCM.
OPENSSL_CONF_FILE = Path(__file__).parent / "templates" / "relay-openssl.cnf"


def relay_dir_of(stream_dir: Path) -> Path:
    """The relay directory of the gateway that owns ``stream_dir`` (``<state>/streams/<uid>``
    -> ``<state>/relay``)."""
    return stream_dir.parent.parent / RELAY_DIR
