"""Per-stream TLS material: self-signed certificates, fingerprints, pinned contexts.

Every stream gets a fresh key pair on each gateway. The peers learn each other's
certificate over the authenticated control path and pin it: the peer's certificate is
the only trust anchor of the context, and the SHA-256 fingerprint of what the peer
presents is checked again after the handshake. TLS 1.3 only.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from pathlib import Path

__all__ = [
    "fingerprint_of_der",
    "fingerprint_of_pem",
    "generate_certificate",
    "pinned_context",
    "write_private",
]


def fingerprint_of_der(der: bytes) -> str:
    """SHA-256 fingerprint as lowercase hex, the form used on the wire."""
    return hashlib.sha256(der).hexdigest()


def fingerprint_of_pem(pem: str) -> str:
    """Fingerprint of the first certificate in a PEM string.

    Raises:
        ValueError: the text holds no parseable certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a PEM certificate: {exc}") from None
    return fingerprint_of_der(cert.public_bytes(Encoding.DER))


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, created with that mode (never chmod later)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def generate_certificate(
    common_name: str, key_path: Path, cert_path: Path, valid_for: datetime.timedelta
) -> tuple[str, str]:
    """Create a P-256 key and a self-signed certificate for one stream end.

    The key is written 0600; the certificate is public. Returns ``(pem, fingerprint)``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Small backdating absorbs clock skew between the two gateways.
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Both ends of the TLS hop use the same kind of certificate: one is a server,
        # the other presents it as a client certificate.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return pem.decode("ascii"), fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


def pinned_context(
    *, server: bool, cert_path: Path, key_path: Path, peer_cert_path: Path
) -> ssl.SSLContext:
    """A TLS 1.3 context that presents our certificate and trusts only the peer's.

    Both sides require a certificate from the other (mutual authentication). Host
    names are not checked: the identity is the pinned certificate, not a name.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_path, key_path)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(peer_cert_path))
    # Stream-lived connections: resumption tickets would only add state to leak.
    # OP_NO_TICKET alone still lets a TLS 1.3 server send two (stateful) tickets;
    # num_tickets = 0 sends none. A client context has no such setting.
    ctx.options |= ssl.OP_NO_TICKET
    if server:
        ctx.num_tickets = 0
    return ctx
