"""Self-signed TLS material for the QUIC transport.

The reference server generates a self-signed certificate when none is configured; we do the
same. ECDSA P-256 is used because every TLS 1.3 stack (quinn/rustls, aioquic) accepts it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1")


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def self_signed_certificate(
    hostnames: Sequence[str] = _DEFAULT_HOSTNAMES, days: int = 365
) -> tuple[bytes, bytes]:
    """A fresh self-signed certificate for ``hostnames``: (PEM certificate, PEM PKCS#8 key).

    Names that parse as IP addresses become IP SAN entries, the rest DNS entries. The
    certificate is its own CA (basicConstraints CA:TRUE) so a client can trust it directly.
    """
    if not hostnames:
        raise ValueError("at least one hostname is required")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    # Backdate a little so a peer with a slightly slow clock accepts it at once.
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([_san_entry(h) for h in hostnames]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def load_or_create(
    cert_path: Path, key_path: Path, hostnames: Sequence[str] = _DEFAULT_HOSTNAMES
) -> tuple[bytes, bytes]:
    """Read the PEM certificate and key, creating a self-signed pair when either is missing.

    The key file is created with mode 0600 from the start (never world-readable, not even
    briefly). Existing files are returned as they are.
    """
    if cert_path.exists() and key_path.exists():
        return cert_path.read_bytes(), key_path.read_bytes()
    cert_pem, key_pem = self_signed_certificate(hostnames)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    # O_CREAT's mode does not apply to a file that already existed.
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert_pem)
    return cert_pem, key_pem
