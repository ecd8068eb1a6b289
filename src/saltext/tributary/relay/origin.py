"""Origin verification: is a spooled batch or heartbeat really from the gateway it names?

The gateway id comes from the event tag (Salt sets it from the authenticated minion id). A
batch proves it with the gateway's signature, checked against the key the top master itself
accepted for that id or the keys its syndic masters vouched for (signed key sets).

The top master's accepted keys are read once and cached: a key file is read again only when
its stat (mtime, ctime, size, inode) changes, and an id with no key file is remembered as such
until the ``minions`` directory changes (Salt accepts and deletes keys by creating and
removing files there), so verifying a batch costs a ``stat`` at most, not an open and read.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from saltext.tributary.protocol import signing
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.spool import RelaySpool

#: Ids remembered as having no key file (cleared when the directory changes): bounded, so a
#: flood of claimed ids cannot grow the relay's memory.
MAX_ABSENT = 4096
ABSENT_TTL_S = 1.0


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class OriginVerifier:
    """Checks signatures against the accepted keys of this master and its syndics."""

    def __init__(self, config: RelayConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}
        self._absent: set[str] = set()
        self._dir_stamp: tuple[int, int, int, int] | None = None
        self._absent_since = float("-inf")

    def local_key(self, minion_id: str) -> str | None:
        """The key this master itself accepted for ``minion_id`` (None if not accepted)."""
        if not minion_id or minion_id in (".", "..") or os.sep in minion_id:
            return None
        directory = os.path.join(self.config.pki_dir or "", "minions")
        try:
            dir_stamp: tuple[int, int, int, int] | None = _stamp(os.stat(directory))
        except OSError:
            dir_stamp = None
        now = time.monotonic()
        with self._lock:
            # a directory stamp is only as fine as the kernel's clock tick: absent ids are
            # looked up again at least once a second
            if dir_stamp != self._dir_stamp or now - self._absent_since > ABSENT_TTL_S:
                self._dir_stamp, self._absent_since = dir_stamp, now
                self._absent.clear()
            elif minion_id in self._absent:
                return None
        path = os.path.join(directory, minion_id)
        try:
            stamp = _stamp(os.stat(path))
        except OSError:
            self._forget(minion_id)
            return None
        with self._lock:
            cached = self._keys.get(minion_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            with open(path, encoding="ascii") as fh:
                pem: str | None = fh.read()
        except OSError:
            self._forget(minion_id)
            return None
        except UnicodeDecodeError:
            pem = None
        with self._lock:
            self._keys[minion_id] = (stamp, pem)
        return pem

    def _forget(self, minion_id: str) -> None:
        """No key file for ``minion_id``: drop what was cached, remember it is absent."""
        with self._lock:
            self._keys.pop(minion_id, None)
            if len(self._absent) < MAX_ABSENT:
                self._absent.add(minion_id)

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
