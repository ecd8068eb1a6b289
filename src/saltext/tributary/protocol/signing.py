"""Origin authentication: gateways sign batches and heartbeats with their Salt minion key, the
relay verifies.

Salt authenticates the minion id of a request, but ``masterapi._minion_event`` fires every event
inside it with whatever tag and data the minion wrote, and behind a syndic the top master sees
only the syndic. So the origin of a batch or a health heartbeat is proven end to end instead:

* the gateway signs each outgoing batch and each health heartbeat (:func:`sign_event`) with its
  own minion private key (``<pki_dir>/minion.pem``, the RSA key pair Salt generated and the
  gateway's master accepted): RSA PKCS#1 v1.5 over SHA-256 of :func:`canonical` (the gateway
  id, a newline, then the event data as sorted, compact JSON without transport fields, and
  for packed rows a newline and their SHA-256), stored base64 in the data's ``sig`` field;
* the relay verifies ``sig`` against the *accepted* public key of the gateway named in the event
  tag. Keys come from the top master's own ``pki_dir/minions`` (gateways attached directly) and
  from key sets that syndic masters publish upward (:func:`sign_keyset` /
  :func:`verify_keyset`): the ``tributary_keys`` engine on each syndic master fires
  ``tributary/keys/<syndic id>`` with its accepted keys, signed with the syndic's own key, which
  the top master has accepted. A gateway cannot forge such a key set (it does not hold the
  syndic's key), and a key set only speaks for the gateways behind that syndic's master.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from saltext.tributary.protocol.errors import ReasonError

#: Fields that are not part of the signed content (added by transport or by the signature).
UNSIGNED_FIELDS = frozenset({"sig", "tag", "id", "_stamp"})

_key_lock = threading.Lock()
_private_keys: dict[str, tuple[float, Any]] = {}
_public_keys: dict[str, Any] = {}


class SignatureError(ReasonError):
    """A batch or heartbeat that fails origin authentication."""


def canonical(gateway: str, data: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: gateway id + canonical JSON of the batch content; a
    batch's packed rows (``rb``, bytes) are covered by their SHA-256 after the JSON, on a line
    of their own (compact JSON never holds a newline, so no other content reads the same)."""
    body = {k: v for k, v in data.items() if k not in UNSIGNED_FIELDS}
    packed = body.get("rb")
    if isinstance(packed, (bytes, bytearray)):
        del body["rb"]
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    out = gateway.encode() + b"\n" + text.encode()
    if isinstance(packed, (bytes, bytearray)):
        out += b"\n" + hashlib.sha256(packed).hexdigest().encode()
    return out


def load_private_key(path: str) -> Any:
    """Load (and cache by mtime) an RSA private key in PEM form."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    mtime = os.stat(path).st_mtime
    with _key_lock:
        hit = _private_keys.get(path)
        if hit and hit[0] == mtime:
            return hit[1]
    with open(path, "rb") as fh:
        key = load_pem_private_key(fh.read(), password=None)
    with _key_lock:
        _private_keys[path] = (mtime, key)
    return key


def load_public_key(pem: str | bytes) -> Any:
    """Parse (and cache) a PEM public key as Salt stores accepted keys."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    raw = pem.encode() if isinstance(pem, str) else pem
    digest = hashlib.sha256(raw.strip()).hexdigest()
    with _key_lock:
        key = _public_keys.get(digest)
    if key is None:
        key = load_pem_public_key(raw.strip() + b"\n")
        with _key_lock:
            if len(_public_keys) > 10_000:
                _public_keys.clear()
            _public_keys[digest] = key
    return key


def minion_key_path(opts: Mapping[str, Any]) -> str:
    return os.path.join(str(opts.get("pki_dir", "/etc/salt/pki/minion")), "minion.pem")


def sign_bytes(key: Any, message: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def verify_bytes(pub: Any, message: bytes, sig: Any) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    if not isinstance(sig, str):
        return False
    try:
        raw = base64.b64decode(sig, validate=True)
        pub.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def sign_event(data: dict[str, Any], opts: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``sig`` to outgoing event data (a batch or a heartbeat; in place; returns it) with
    this minion's key, over :func:`canonical` of the minion id and the data."""
    key = load_private_key(minion_key_path(opts))
    data["sig"] = sign_bytes(key, canonical(str(opts["id"]), data))
    return data


def sign_batch(batch: dict[str, Any], opts: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``sig`` to an outgoing batch (in place; returns it) with this minion's key."""
    return sign_event(batch, opts)


def verify_event(gateway: str, data: Mapping[str, Any], pem: str | bytes | None) -> None:
    """Raise SignatureError unless ``data`` (a batch, a heartbeat, a key set) carries a valid
    signature by ``gateway``'s key."""
    sig = data.get("sig")
    if sig is None:
        raise SignatureError("unsigned", f"event from {gateway} carries no signature")
    if pem is None:
        raise SignatureError("unknown_key", f"no accepted key is known for {gateway}")
    try:
        pub = load_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError("unknown_key", f"accepted key of {gateway} is unusable: {exc}")
    try:
        message = canonical(gateway, data)
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. mixed-type or non-str keys
        raise SignatureError("bad_payload", f"event data cannot be canonicalised: {exc}") from None
    if not verify_bytes(pub, message, sig):
        raise SignatureError("bad_signature", f"signature does not match {gateway}'s accepted key")


#: Batches and heartbeats are verified alike.
verify_batch = verify_event


# -- key sets published by syndic masters ---------------------------------------------------


def read_accepted_keys(pki_dir: str) -> dict[str, str]:
    """Accepted minion keys of a master: ``{minion id: PEM}`` from ``<pki_dir>/minions``."""
    out: dict[str, str] = {}
    folder = os.path.join(pki_dir, "minions")
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="ascii") as fh:
                out[name] = fh.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
    return out


def sign_keyset(syndic_id: str, keys: Mapping[str, str], key_path: str) -> dict[str, Any]:
    """The event data a syndic master publishes: its accepted keys, signed by the syndic."""
    now = time.time()
    data: dict[str, Any] = {
        "v": 1,
        "syndic": syndic_id,
        "ts": int(now),
        "ts_ms": int(now * 1000),  # orders the sets of one syndic: an older one never wins
        "keys": dict(keys),
    }
    data["sig"] = sign_bytes(load_private_key(key_path), canonical(syndic_id, data))
    return data


def verify_keyset(
    syndic_id: str, data: Mapping[str, Any], syndic_pem: str | bytes | None
) -> dict[str, str]:
    """The key set if it is signed by ``syndic_id``'s accepted key; raises SignatureError."""
    if not isinstance(data, Mapping) or data.get("v") != 1 or data.get("syndic") != syndic_id:
        raise SignatureError("bad_keyset", "not a v1 key set for this syndic")
    keys = data.get("keys")
    if not isinstance(keys, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in keys.items()
    ):
        raise SignatureError("bad_keyset", "keys must map minion ids to PEM strings")
    verify_batch(syndic_id, data, syndic_pem)
    return dict(keys)
