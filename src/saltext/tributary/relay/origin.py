"""Origin verification: is a spooled batch or heartbeat really from the gateway it names?

The gateway id comes from the event tag (Salt sets it from the authenticated minion id). A
batch proves it with the gateway's signature, checked against the key the top master itself
accepted for that id or the keys its syndic masters vouched for (signed key sets).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from saltext.tributary.protocol import signing
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.spool import RelaySpool


class OriginVerifier:
    """Checks signatures against the accepted keys of this master and its syndics."""

    def __init__(self, config: RelayConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters

    def local_key(self, minion_id: str) -> str | None:
        """The key this master itself accepted for ``minion_id`` (None if not accepted)."""
        if not minion_id or minion_id in (".", "..") or os.sep in minion_id:
            return None
        path = os.path.join(self.config.pki_dir or "", "minions", minion_id)
        try:
            with open(path, encoding="ascii") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError):
            return None

    def keyset(self, syndic_id: str, data: Any) -> dict[str, str]:
        """The gateway keys a syndic's signed key set vouches for (raises SignatureError)."""
        return signing.verify_keyset(syndic_id, data, self.local_key(syndic_id))

    def trusts(self, syndic_id: str) -> bool:
        """Is ``syndic_id`` one whose key sets may vouch for gateways?"""
        return syndic_id in (self.config.trusted_syndics or ())

    def verify(
        self, spool: RelaySpool, gateway: str, data: Mapping[str, Any], received_ms: int
    ) -> None:
        """Raise SignatureError unless ``data`` is signed by ``gateway``'s accepted key: the
        top master's own when it accepted ``gateway`` directly, else the key of the one syndic
        ``gateway`` is bound to, as vouched for when the row arrived (``received_ms``)."""
        if data.get("sig") is None and self.config.allow_unsigned:
            self.counters.inc("unsigned_accepted")
            return
        local = self.local_key(gateway)
        ttl_ms = int(self.config.keyset_ttl_s * 1000)
        pems = [local] if local else spool.keyring.keys_for(gateway, received_ms, ttl_ms)
        if not pems:
            signing.verify_batch(gateway, data, None)
        last: signing.SignatureError | None = None
        for pem in pems:
            try:
                signing.verify_batch(gateway, data, pem)
                return
            except signing.SignatureError as exc:
                last = exc
        assert last is not None
        raise last
