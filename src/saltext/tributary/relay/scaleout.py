"""Scale-out mode: a relay on each syndic master indexes its own gateways; the top keeps the ledger.

Roles (``scaleout.role`` of the ``tributary_relay`` engine):

* ``single`` (default): one relay on the top master indexes the whole fleet.
* ``syndic``: a relay on a syndic master. It verifies its gateways against the keys this
  syndic master itself accepted (``pki_dir/minions``, the same file Salt authenticates them
  with), spools, bulk-creates with the usual ids ``<gateway>:<epoch>:<seq>`` and keeps its own
  ledger. Every ``receipt_s`` it fires ``tributary/receipt/<syndic_id>`` on its master's bus: the
  merged sequence ranges Elasticsearch confirmed (and the heartbeats' ``last_seq``) of every
  (gateway, epoch) that moved since the last receipt, signed with the syndic's own key (the one
  the top master accepted for the syndic). salt-syndic (Salt 3006/3007) or ``tributary_uplink``
  (3008) carries it up. A receipt is sent even when nothing moved: it is the relay's liveness.
  Every ``full_receipt_s`` the ranges of every epoch active within ``full_window_s`` go up again,
  so a receipt lost while the top master was away heals without a replay. Gap repair is left to
  the top master (one repairer for the fleet).
* ``top``: the top master's relay. A batch or heartbeat of a gateway bound (keyring: the one
  source that vouches for its key) to a syndic listed in ``syndic_relays`` is *owned* by that
  syndic's relay and skipped at intake, as long as that relay is live (a verified receipt
  within ``takeover_s``). Receipts are verified against the top master's accepted key of the
  syndic, refused unless the syndic is in ``syndic_relays``, and each entry is taken only for a
  gateway bound to that syndic; their ranges and heartbeats go into the top's ledger, so
  ``tributary.status``/``gaps``/``health``'s ledger view and gap repair see the whole fleet.

Why it stays exactly once: a reading's document id is deterministic, so whichever relay
creates it, any other attempt is answered 409 (already present). While a syndic relay is
down (no receipt for ``takeover_s``) the top relay indexes its gateways' batches itself (they
still reach the top through salt-syndic or the uplink); the batches the top skipped between the
syndic relay's last receipt and the takeover, and that the syndic relay never confirmed, show
up in the top's ledger as a hole once later ranges arrive (or a heartbeat's ``last_seq`` passes
them), and gap repair asks the gateway to replay them; a syndic relay stopped with batches in
its spool ships them when it is back (409 where the top was first). Nothing is indexed twice;
at worst a reading is *sent* twice and answered 409.

Pure logic: no Salt, no Elasticsearch (the engine does the I/O); unit tested directly.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from saltext.tributary.protocol import signing
from saltext.tributary.protocol.wire import EPOCH_RE, MAX_INT
from saltext.tributary.relay.config import ScaleoutConfig
from saltext.tributary.relay.counters import Counters
from saltext.tributary.relay.ledger import Ledger
from saltext.tributary.util.clock import now_ms

log = logging.getLogger(__name__)

#: the syndic relay's last receipt time, kept over restarts (see ``ReceiptSender._resume_ts``)
SENT_DDL = (
    "CREATE TABLE IF NOT EXISTS scaleout_sent (syndic TEXT PRIMARY KEY, ts_ms INTEGER NOT NULL)"
)
RECEIPT_TAG = "tributary/receipt/{syndic}"
#: (gateway, epoch) entries per receipt event (each a few dozen bytes: a receipt stays far
#: below the 32 KiB a batch event may be).
ENTRIES_PER_RECEIPT = 200
#: Ranges sent per (gateway, epoch) at most: the most recent ones (a syndic relay's ledger keeps
#: the holes the top relay filled while it was down).
RANGES_PER_ENTRY = 64
#: How often the top relay re-reads which gateway is bound to which syndic.
BINDING_REFRESH_S = 5.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS scaleout_relays (syndic TEXT PRIMARY KEY, ts_ms INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL, receipts INTEGER NOT NULL DEFAULT 0,
    entries INTEGER NOT NULL DEFAULT 0, spool_batches INTEGER, spool_oldest_s REAL);
"""

Entry = tuple[str, str, list[tuple[int, int]], int]


# -- syndic side ------------------------------------------------------------------------------


def moved_since(db: sqlite3.Connection, since: float) -> list[tuple[str, str]]:
    """(gateway, epoch) pairs whose ranges or heartbeat moved at or after ``since`` (s)."""
    return [
        (gw, ep)
        for gw, ep in db.execute(
            "SELECT gateway, epoch FROM ledger_heads WHERE max(indexed_at, hb_at) >= ?"
            " ORDER BY gateway, epoch",
            (since,),
        )
    ]


def entries(ledger: Ledger, pairs: list[tuple[str, str]]) -> list[Entry]:
    """What a receipt says of each pair: its merged ranges (the latest
    :data:`RANGES_PER_ENTRY`) and the heartbeat's ``last_seq`` (0: none)."""
    out: list[Entry] = []
    for gw, ep in pairs:
        row = ledger.db.execute(
            "SELECT hb_last FROM ledger_heads WHERE gateway=? AND epoch=?", (gw, ep)
        ).fetchone()
        ranges = ledger.ranges(gw, ep)[-RANGES_PER_ENTRY:]
        out.append((gw, ep, ranges, int(row[0]) if row else 0))
    return out


def sign_receipt(syndic_id: str, data: dict[str, Any], key_path: str) -> dict[str, Any]:
    """Add ``sig`` (the syndic's key over :func:`signing.canonical` of the receipt)."""
    data["sig"] = signing.sign_bytes(
        signing.load_private_key(key_path), signing.canonical(syndic_id, data)
    )
    return data


class ReceiptSender:
    """Decides what the syndic relay's next receipts say (the engine signs and fires them)."""

    def __init__(
        self,
        syndic_id: str,
        cfg: ScaleoutConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.syndic_id = syndic_id
        self.cfg = cfg
        self.clock = clock
        self._since = 0.0  # everything the ledger holds goes up first (a restart heals too)
        self._last_full = clock()
        self._last_ts = 0
        self._resumed = False

    def _ts(self) -> int:
        ts = max(now_ms(), self._last_ts + 1)  # strictly increasing: a stale one is refused
        self._last_ts = ts
        return ts

    def _resume_ts(self, db: sqlite3.Connection) -> None:
        """Carry the last receipt time over a restart: the top refuses a receipt not newer
        than the last it took, so a syndic relay restarted after its clock stepped back would
        otherwise be refused (and taken over) until its clock passed the old time again."""
        db.execute(SENT_DDL)
        row = db.execute("SELECT ts_ms FROM scaleout_sent WHERE syndic=?", (self.syndic_id,))
        last = row.fetchone()
        self._last_ts = max(self._last_ts, int(last[0]) if last else 0)
        self._resumed = True

    def _save_ts(self, db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO scaleout_sent VALUES (?, ?) ON CONFLICT(syndic) DO UPDATE SET"
            " ts_ms = excluded.ts_ms",
            (self.syndic_id, self._last_ts),
        )

    def next_receipts(
        self, ledger: Ledger, spool_depth: tuple[int, float | None] = (0, None)
    ) -> list[dict[str, Any]]:
        """The unsigned receipts to send now (at least one: the liveness). The last receipt
        time is kept in the ledger's database before they are returned."""
        if not self._resumed:
            self._resume_ts(ledger.db)
        now = self.clock()
        full = now - self._last_full >= self.cfg.full_receipt_s
        since = now - self.cfg.full_window_s if full else self._since
        # ledger times are written by another thread just before its commit: look back a
        # second (a range sent twice is harmless, the top merges it)
        pairs = moved_since(ledger.db, since - 1.0 if since else 0.0)
        self._since = now
        if full:
            self._last_full = now
        found = entries(ledger, pairs)
        chunks = [
            found[i : i + ENTRIES_PER_RECEIPT] for i in range(0, len(found), ENTRIES_PER_RECEIPT)
        ] or [[]]
        depth, oldest = spool_depth
        out = [
            {
                "v": 1,
                "syndic": self.syndic_id,
                "ts_ms": self._ts(),
                "full": full,
                "spool": [int(depth), oldest],
                "ranges": [[gw, ep, [list(r) for r in rs], hb] for gw, ep, rs, hb in chunk],
            }
            for chunk in chunks
        ]
        self._save_ts(ledger.db)
        return out


# -- top side ---------------------------------------------------------------------------------


def parse_receipt(syndic_id: str, data: Any) -> list[Entry]:
    """The entries of a receipt's body (raises SignatureError ``bad_receipt``)."""
    if not isinstance(data, Mapping) or data.get("v") != 1 or data.get("syndic") != syndic_id:
        raise signing.SignatureError("bad_receipt", "not a v1 receipt for this syndic")
    ts = data.get("ts_ms")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise signing.SignatureError("bad_receipt", "ts_ms must be an integer")
    raw = data.get("ranges")
    if not isinstance(raw, list):
        raise signing.SignatureError("bad_receipt", "ranges must be a list")
    out: list[Entry] = []
    for n, item in enumerate(raw):
        ok = isinstance(item, (list, tuple)) and len(item) == 4
        if ok:
            gw, ep, rs, hb = item
            ok = (
                isinstance(gw, str)
                and isinstance(ep, str)
                and EPOCH_RE.fullmatch(ep) is not None
                and type(hb) is int
                and 0 <= hb < MAX_INT
                and isinstance(rs, (list, tuple))
                and all(
                    isinstance(r, (list, tuple))
                    and len(r) == 2
                    and type(r[0]) is int
                    and type(r[1]) is int
                    and 1 <= r[0] <= r[1] < MAX_INT
                    for r in rs
                )
            )
        if not ok:
            raise signing.SignatureError(
                "bad_receipt", f"ranges[{n}] is not [gw, epoch, ranges, last]"
            )
        out.append((gw, ep, [(int(a), int(b)) for a, b in rs], hb))
    return out


@dataclasses.dataclass
class ReceiptResult:
    taken: int = 0  # entries recorded in the ledger
    not_owned: list[str] = dataclasses.field(default_factory=list)  # gateways not bound to it
    refused: str | None = None  # why the whole receipt was refused


class Ownership:
    """The top relay's view of which syndic relay owns which gateway, and which are live."""

    def __init__(self, cfg: ScaleoutConfig, clock: Callable[[], float] = time.time) -> None:
        self.relays = frozenset(cfg.syndic_relays or ())
        self.takeover_s = cfg.takeover_s
        self.clock = clock
        self._binding: dict[str, str] = {}
        self._seen: dict[str, float] = {}  # syndic -> wall time of its last receipt (s)
        self._loaded = float("-inf")

    def load(self, db: sqlite3.Connection) -> None:
        """Re-read the gateways bound to a syndic relay and the relays' last receipts."""
        marks = ",".join("?" * len(self.relays))
        self._binding = (
            dict(
                db.execute(
                    f"SELECT gateway, source FROM gateway_keys WHERE source IN ({marks})",
                    tuple(self.relays),
                )
            )
            if self.relays
            else {}
        )
        try:
            seen = db.execute("SELECT syndic, seen_ms FROM scaleout_relays").fetchall()
        except sqlite3.OperationalError:  # not created yet
            seen = []
        for syndic, seen_ms in seen:
            if syndic in self.relays:
                self._seen[syndic] = max(self._seen.get(syndic, 0.0), seen_ms / 1000)
        self._loaded = self.clock()

    def owner(self, gateway: str) -> str | None:
        return self._binding.get(gateway)

    def live(self, syndic: str, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return now - self._seen.get(syndic, float("-inf")) <= self.takeover_s

    def state(self, gateway: str, db: sqlite3.Connection | None = None) -> str | None:
        """``None`` (no syndic relay owns the gateway), ``"live"`` (its owner indexes it: skip)
        or ``"down"`` (its owner sent no receipt for ``takeover_s``: the top indexes it).
        Re-reads the bindings every :data:`BINDING_REFRESH_S` when given ``db``."""
        now = self.clock()
        if db is not None and now - self._loaded >= BINDING_REFRESH_S:
            self.load(db)
        owner = self._binding.get(gateway)
        if owner is None:
            return None
        return "live" if self.live(owner, now) else "down"

    def skip(self, gateway: str, db: sqlite3.Connection | None = None) -> bool:
        """Is this gateway's event left to its live syndic relay?"""
        return self.state(gateway, db) == "live"

    def heard(self, syndic: str, when: float | None = None) -> None:
        self._seen[syndic] = self.clock() if when is None else when

    def apply(
        self, ledger: Ledger, syndic: str, data: Mapping[str, Any], body: list[Entry]
    ) -> ReceiptResult:
        """Record a verified receipt in the ledger (call inside a write transaction)."""
        db = ledger.db
        if syndic not in self.relays:
            return ReceiptResult(refused="not_a_syndic_relay")
        ts = int(data["ts_ms"])
        row = db.execute("SELECT ts_ms FROM scaleout_relays WHERE syndic=?", (syndic,)).fetchone()
        if row is not None and ts <= row[0]:
            return ReceiptResult(refused="stale")
        bound = {
            gw for (gw,) in db.execute("SELECT gateway FROM gateway_keys WHERE source=?", (syndic,))
        }
        out = ReceiptResult()
        for gw, ep, ranges, hb in body:
            if gw not in bound:
                out.not_owned.append(gw)
                continue
            for lo, hi in ranges:
                ledger.add_range(gw, ep, lo, hi)
            if hb:
                ledger.heartbeat(gw, ep, hb)
            out.taken += 1
        spool = data.get("spool")
        depth, oldest = spool if isinstance(spool, list) and len(spool) == 2 else (None, None)
        now = now_ms()
        db.execute(
            "INSERT INTO scaleout_relays VALUES (?,?,?,1,?,?,?) ON CONFLICT(syndic) DO UPDATE SET"
            " ts_ms=excluded.ts_ms, seen_ms=excluded.seen_ms, receipts=receipts+1,"
            " entries=entries+excluded.entries, spool_batches=excluded.spool_batches,"
            " spool_oldest_s=excluded.spool_oldest_s",
            (
                syndic,
                ts,
                now,
                out.taken,
                depth if type(depth) is int else None,
                oldest if isinstance(oldest, (int, float)) else None,
            ),
        )
        self.heard(syndic, now / 1000)
        return out


class ReceiptIntake:
    """Takes ``tributary/receipt/<syndic>`` events off the top master's bus."""

    def __init__(
        self,
        ownership: Ownership,
        spool: Any,
        local_key: Callable[[str], str | None],
        counters: Counters,
    ) -> None:
        self.ownership = ownership
        self.spool = spool
        self.local_key = local_key
        self.counters = counters
        self._recent: OrderedDict[str, None] = OrderedDict()
        with spool.write_lock:
            spool.db.executescript(SCHEMA)
        ownership.load(spool.db)

    def accept(self, syndic: str, data: Any) -> bool:
        sig = data.get("sig") if isinstance(data, Mapping) else None
        if isinstance(sig, str):
            if sig in self._recent:  # the second copy salt-syndic forwards
                return False
            self._recent[sig] = None
            if len(self._recent) > 1000:
                self._recent.popitem(last=False)
        if syndic not in self.ownership.relays:
            return self._refused(syndic, "not_a_syndic_relay", "not in scaleout.syndic_relays")
        try:
            body = parse_receipt(syndic, data)
            signing.verify_event(syndic, data, self.local_key(syndic))
        except signing.SignatureError as exc:
            return self._refused(syndic, exc.reason, exc.detail)
        with self.spool.transaction():
            result = self.ownership.apply(self.spool.ledger, syndic, data, body)
        if result.refused:
            if result.refused == "stale":
                self.counters.inc("receipts_stale")
                return False
            return self._refused(syndic, result.refused, "")
        if result.not_owned:
            self.counters.inc("receipt_entries_not_owned", len(result.not_owned))
            log.warning(
                "tributary relay: receipt of %s names gateways not bound to it (ignored): %s",
                syndic,
                ", ".join(result.not_owned[:20]),
            )
        self.counters.inc("receipts_in")
        return True

    def _refused(self, syndic: str, reason: str, detail: str) -> bool:
        self.counters.inc(f"receipt_rejected:{reason}")
        log.error(
            "tributary relay: receipt claiming syndic %s refused: %s %s", syndic, reason, detail
        )
        return False


def relays_view(db: sqlite3.Connection, cfg: ScaleoutConfig) -> dict[str, Any]:
    """For ``tributary.status``: each syndic relay, its gateways, last receipt, state."""
    try:
        rows = {r[0]: r[1:] for r in db.execute("SELECT * FROM scaleout_relays")}
    except sqlite3.OperationalError:
        rows = {}
    counts = dict(db.execute("SELECT source, COUNT(*) FROM gateway_keys GROUP BY source"))
    now = now_ms()
    out = {}
    for syndic in cfg.syndic_relays or ():
        _ts, seen_ms, receipts, _n, depth, oldest = rows.get(syndic, (0, 0, 0, 0, None, None))
        age = (now - seen_ms) / 1000 if seen_ms else None
        out[syndic] = {
            "gateways": counts.get(syndic, 0),
            "state": "live" if age is not None and age <= cfg.takeover_s else "taken_over",
            "last_receipt_age_s": None if age is None else round(age, 1),
            "receipts": receipts,
            "spool_batches": depth,
            "spool_oldest_s": oldest,
        }
    return out


# -- wiring (the engine calls these) ----------------------------------------------------------


def attach_top(relay: Any) -> ReceiptIntake:
    """Make a top relay (:class:`~saltext.tributary.relay.pipeline.Relay`) skip what live
    syndic relays own, take over what dead ones owned, and take their receipts."""
    ownership = Ownership(relay.config.scaleout)
    receipts = ReceiptIntake(ownership, relay.spool, relay.origin.local_key, relay.counters)
    db = relay.spool.db
    counters = relay.counters

    def owned(gateway: str) -> bool:
        state = ownership.state(gateway, db)
        if state == "down":
            counters.inc("taken_over")  # its syndic relay is silent: indexed here
        return state == "live"

    relay.intake.owned = owned
    relay.intake.receipts = receipts.accept
    return receipts


def default_signing_key(pki_dir: str, configured: str | None = None) -> str:
    """The syndic's own key, as ``tributary_keys`` finds it: ``configured``, else
    ``<pki_dir>/minion.pem`` if present, else ``/etc/salt/pki/minion/minion.pem``."""
    import os

    if configured:
        return configured
    for path in (os.path.join(pki_dir, "minion.pem"), "/etc/salt/pki/minion/minion.pem"):
        if os.path.exists(path):
            return path
    return os.path.join(pki_dir, "minion.pem")


class ReceiptLoop:
    """The syndic relay's receipt thread: every ``receipt_s`` the next receipts, signed, handed
    to ``fire(data, tag)`` (the engine fires them on the syndic master's bus)."""

    def __init__(
        self,
        spool_path: str,
        cfg: ScaleoutConfig,
        key_path: str,
        fire: Callable[[dict[str, Any], str], Any],
    ) -> None:
        import threading

        self.spool_path = spool_path
        self.cfg = cfg
        self.key_path = key_path
        self.fire = fire
        self.sender = ReceiptSender(str(cfg.syndic_id), cfg)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tributary-receipts", daemon=True)
        self.sent = 0

    def once(self, spool: Any) -> int:
        """Sign and fire the receipts due now; how many went."""
        depth, oldest = spool.depth()
        age = round((now_ms() - oldest) / 1000, 1) if oldest else None
        receipts = self.sender.next_receipts(spool.ledger, (depth, age))
        tag = RECEIPT_TAG.format(syndic=self.sender.syndic_id)
        for data in receipts:
            self.fire(sign_receipt(self.sender.syndic_id, data, self.key_path), tag)
        self.sent += len(receipts)
        return len(receipts)

    def _loop(self) -> None:
        from saltext.tributary.relay.spool import RelaySpool

        spool = RelaySpool(self.spool_path)
        try:
            while True:
                try:
                    self.once(spool)
                except Exception:  # a failed receipt is sent again with the next one
                    log.exception("tributary relay: receipt not sent")
                    self.sender._since = 0.0
                if self._stop.wait(self.cfg.receipt_s):
                    return
        finally:
            spool.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
