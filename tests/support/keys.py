"""RSA key pairs in Salt's file format, written without Salt's own key helpers (whose
signature changed in Salt 3008: ``salt.crypt.gen_keys`` returns strings there)."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def write_keypair(directory: str | os.PathLike, name: str = "minion", bits: int = 2048) -> str:
    """Write ``<name>.pem`` (Salt's "BEGIN RSA PRIVATE KEY") and ``<name>.pub`` into
    ``directory``; returns the public key as Salt stores accepted keys (no final newline)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.pem"), "wb") as fh:
        fh.write(pem)
    os.chmod(os.path.join(directory, f"{name}.pem"), 0o600)
    with open(os.path.join(directory, f"{name}.pub"), "wb") as fh:
        fh.write(pub)
    return pub.decode().strip()
