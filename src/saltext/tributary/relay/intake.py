"""Relay intake: what the relay takes from the top master's event bus (bus reader thread).

Tributary batches (``salt/beacon/<gateway>/<beacon>/batch``, also when they arrive a second
time as ``syndic/<syndic>/salt/beacon/...``) and heartbeats are appended to the relay spool and
intake returns at once; syndic key sets (``tributary/keys/<syndic>``) are verified and stored.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from saltext.tributary.protocol import signing
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.documents import batch_key, bounded
from saltext.tributary.relay.origin import OriginVerifier
from saltext.tributary.relay.spool import RelaySpool
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

TAG_RE = re.compile(
    r"^(?:syndic/[^/]+/)*salt/beacon/(?P<gw>[^/]+)/(?P<beacon>[^/]+)/(?P<kind>batch|health)$"
)
KEYS_RE = re.compile(r"^(?:syndic/[^/]+/)*tributary/keys/(?P<syndic>[^/]+)$")
RECEIPT_RE = re.compile(r"^(?:syndic/[^/]+/)*tributary/receipt/(?P<syndic>[^/]+)$")
#: Past this many puts the spool's disk budget is checked again.
BUDGET_EVERY = 64


def unwrap(data: Any, marker: str) -> Any:
    """A single event sent with ``event.fire_master`` arrives as the whole request load
    (``masterapi._minion_event`` fires the load itself): the payload is its ``data``."""
    if isinstance(data, Mapping) and marker not in data and isinstance(data.get("data"), Mapping):
        return data["data"]
    return data


class Intake:
    """Spools Tributary events; everything else on the bus is ignored."""

    def __init__(
        self,
        config: RelayConfig,
        spool: RelaySpool,
        counters: Counters,
        origin: OriginVerifier,
        wake: threading.Event,
    ) -> None:
        self.config = config
        self.spool = spool
        self.counters = counters
        self.origin = origin
        self._wake = wake
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._puts = 0
        #: scale-out (``relay.scaleout``): on the top relay, ``owned(gateway)`` says a live
        #: syndic relay indexes that gateway (its events are skipped) and ``receipts`` takes
        #: the syndic relays' receipts; a syndic relay takes no key sets (``keysets``)
        self.owned: Callable[[str], bool] | None = None
        self.receipts: Callable[[str, Any], bool] | None = None
        self.keysets = config.scaleout.role != "syndic"

    def _seen(self, key: str) -> bool:
        """True if ``key`` was seen within the de-duplication window (and remember it)."""
        if key in self._recent:
            return True
        self._recent[key] = None
        if len(self._recent) > self.config.dedup_window:
            self._recent.popitem(last=False)
        return False

    def accept(self, tag: str, data: Any) -> bool:
        """Spool one bus event if it is a Tributary batch; True if it was taken."""
        m = TAG_RE.match(tag)
        if m is None:
            k = KEYS_RE.match(tag)
            if k is not None:
                return self.keysets and self.accept_keys(k.group("syndic"), data)
            r = RECEIPT_RE.match(tag) if self.receipts is not None else None
            if r is not None and self.receipts is not None:
                return self.receipts(r.group("syndic"), unwrap(data, "ranges"))
            return False
        gateway, kind = m.group("gw"), m.group("kind")
        self.counters.inc("events_in")
        if self.owned is not None and self.owned(gateway):
            self.counters.inc("owned_skipped")  # its syndic relay indexes it
            return False
        data = unwrap(data, "v")
        if not isinstance(data, Mapping):
            data = {"_raw": repr(data)[:4096]}
        ukey = f"{kind}:{batch_key(gateway, data)}"
        if kind == "health":
            ukey += f":{data.get('_stamp')}"
        if self._seen(ukey):
            self.counters.inc("duplicate_events")
            return False
        payload = {k: v for k, v in data.items() if k != "_stamp"}
        payload, verified = self._verified(gateway, payload)
        if self.spool.put(gateway, kind, ukey, payload, verified):
            self.counters.inc("batches_in")
            self._puts += 1
            if self._puts % BUDGET_EVERY == 0:
                self.check_budget()
            self._wake.set()
            return True
        self.counters.inc("duplicate_events")
        return False

    def _verified(self, gateway: str, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Check origin before the event takes spool space: a refused one is spooled as its
        reason and a bounded copy (for its dead letter); one whose key is not known yet is
        spooled whole, to wait for its key, and is the first dropped past the disk budget."""
        if data.get("sig") is None and self.config.allow_unsigned:
            return data, 0  # counted once, when planned
        try:
            self.origin.verify(self.spool, gateway, data, now_ms())
        except signing.SignatureError as exc:
            if exc.reason == "unknown_key":
                return data, 0
            return {"_refused": exc.reason, "_detail": exc.detail, "original": bounded(data)}, -1
        return data, 1

    def check_budget(self) -> None:
        """Past the disk budget, drop the oldest spooled batches: counted, logged loudly."""
        batches, readings = self.spool.enforce_budget(self.config.spool_max_bytes)
        if batches:
            self.counters.inc("spool_dropped_batches", batches)
            self.counters.inc("spool_dropped_readings", readings)
            log.error(
                "tributary relay: spool past its budget of %d bytes: dropped the %d oldest"
                " batches (%d readings); the ledger will ask gateways to replay them",
                self.config.spool_max_bytes,
                batches,
                readings,
            )

    def accept_keys(self, syndic_id: str, data: Any) -> bool:
        """A syndic master's accepted gateway keys, signed by that syndic's own key: taken
        only from a trusted syndic, never older than its last set, never for a gateway bound
        to another source (see :mod:`~saltext.tributary.relay.keyring`)."""
        data = unwrap(data, "keys")
        if self._seen(repr(data.get("sig") if isinstance(data, Mapping) else data)):
            return False
        if not self.origin.trusts(syndic_id):
            return self._keyset_refused(syndic_id, "untrusted_syndic", "not in trusted_syndics")
        try:
            keys = self.origin.keyset(syndic_id, data)
        except signing.SignatureError as exc:
            return self._keyset_refused(syndic_id, exc.reason, str(exc))
        ts = data.get("ts_ms")
        if isinstance(ts, bool) or not isinstance(ts, int):
            ts = int(data.get("ts") or 0) * 1000  # key sets of an older tributary_keys
        with self.spool.transaction():
            result = self.spool.keyring.take(
                syndic_id,
                ts,
                keys,
                int(self.config.keyset_ttl_s * 1000),
                is_local=lambda gw: self.origin.local_key(gw) is not None,
            )
        if result.refused:
            return self._keyset_refused(syndic_id, result.refused, f"key set of {ts} ms")
        if result.new_conflicts:  # counted and logged once per (gateway, claiming syndic)
            self.counters.inc("keyset_conflicts", len(result.new_conflicts))
            log.error(
                "tributary relay: syndic %s vouched for gateways bound to another source,"
                " refused (salt-run tributary.status lists them): %s",
                syndic_id,
                ", ".join(result.new_conflicts[:20]),
            )
        self.spool.release_holds()
        self.counters.inc("keysets_in")
        self._wake.set()
        return True

    def _keyset_refused(self, syndic_id: str, reason: str, detail: str) -> bool:
        self.counters.inc(f"keyset_rejected:{reason}")
        log.error("tributary relay: key set claiming syndic %s refused: %s", syndic_id, detail)
        return False
