"""A throw-away CA and a server certificate for 127.0.0.1 / localhost (TLS tests)."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str = "tributary test CA") -> tuple[x509.Certificate, Any]:
    """A self-signed CA certificate valid for a day, and its key."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return ca, ca_key


def make_pki(d: pathlib.Path) -> dict[str, str]:
    """A CA and a server certificate for localhost / 127.0.0.1 signed by it, as PEM files in
    ``d``: ``{"ca": path, "cert": path, "key": path}``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca, ca_key = make_ca()
    ca_name = ca.subject
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca": (d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "cert": (d / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        "key": (d / "server.key", _pem_key(key)),
    }
    for path, data in files.values():
        path.write_bytes(data)
        path.chmod(0o644)  # test material; the broker reads it as the mosquitto user
    return {k: str(p) for k, (p, _) in files.items()}
