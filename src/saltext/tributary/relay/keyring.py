"""Which key may sign for which gateway: the relay's keyring (tables in the relay spool).

Who vouches for whom:

* a gateway attached directly to the top master is vouched for by the top master itself (its
  accepted key in ``pki_dir/minions``), for its own minion id only;
* a gateway behind a syndic master is vouched for by that syndic, through the key sets its
  ``tributary_keys`` engine publishes, signed with the syndic's own key, and only if the syndic
  is one the relay is configured to trust (``trusted_syndics``);
* each gateway id is bound to exactly one source: the top master when it holds the gateway's
  key, otherwise the first live trusted syndic that vouched for it. Another syndic claiming a
  bound gateway is refused and counted (a conflict, shown by ``salt-run tributary.status``)
  until the first source expires (no key set for ``keyset_ttl_s``) or is retired by the
  operator (``salt-run tributary.retire_syndic``);
* key sets carry the publication time in ms; one older than (or as old as) the last set taken
  from the same syndic never replaces it, so a replayed old set cannot bring back a deleted key.

A key vouched for by a syndic verifies the rows that arrived while its key set was live (up to
``keyset_ttl_s`` after the syndic's last set), so a backlog spooled during an outage still
verifies after the syndic went quiet.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.util.clock import now_ms

SCHEMA = """
CREATE TABLE IF NOT EXISTS key_sources (source TEXT PRIMARY KEY, ts_ms INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL, retired INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS key_conflicts (gateway TEXT NOT NULL, claimed_by TEXT NOT NULL,
    bound_to TEXT NOT NULL, n INTEGER NOT NULL, last_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, claimed_by));
"""
#: Conflicts kept for the status view (the oldest are forgotten past it).
MAX_CONFLICTS = 1000


@dataclass
class KeysetResult:
    """What taking one key set did."""

    taken: int = 0  # gateway keys now vouched for by this source
    conflicts: int = 0  # gateways bound to another source: refused
    new_conflicts: list[str] = field(default_factory=list)  # ... not refused before
    refused: str | None = None  # reason the whole set was refused (stale, retired)


class Keyring:
    """Key sources, gateway bindings and conflicts over a relay spool's connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def _live_sources(self, now: int, ttl_ms: int) -> set[str]:
        return {
            s
            for (s,) in self.db.execute(
                "SELECT source FROM key_sources WHERE retired=0 AND seen_ms>=?", (now - ttl_ms,)
            )
        }

    def take(
        self,
        source: str,
        ts_ms: int,
        keys: Mapping[str, str],
        ttl_ms: int,
        is_local: Any = lambda gw: False,
    ) -> KeysetResult:
        """Take a verified key set from ``source`` (call inside a write transaction)."""
        now = now_ms()
        row = self.db.execute(
            "SELECT ts_ms, retired FROM key_sources WHERE source=?", (source,)
        ).fetchone()
        if row is not None and row[1]:
            return KeysetResult(refused="retired")
        if row is not None and ts_ms <= row[0]:
            return KeysetResult(refused="stale")
        self.db.execute(
            "INSERT INTO key_sources (source, ts_ms, seen_ms) VALUES (?,?,?)"
            " ON CONFLICT(source) DO UPDATE SET ts_ms=excluded.ts_ms, seen_ms=excluded.seen_ms",
            (source, ts_ms, now),
        )
        live = self._live_sources(now, ttl_ms)
        bound = {
            gw: src
            for gw, src in self.db.execute(
                "SELECT gateway, source FROM gateway_keys WHERE source<>?", (source,)
            )
            if src in live
        }
        out = KeysetResult()
        accepted: dict[str, str] = {}
        for gw, pem in keys.items():
            local = is_local(gw)
            if gw == source and local:
                # the syndic host's own minion: attached to the top master as the syndic
                # itself and verified by the key the top master accepted; not a claim
                continue
            owner = "top master" if local else bound.get(gw)
            if owner is not None:
                out.conflicts += 1
                seen = self.db.execute(
                    "SELECT 1 FROM key_conflicts WHERE gateway=? AND claimed_by=?", (gw, source)
                ).fetchone()
                if seen is None:
                    out.new_conflicts.append(gw)
                self.db.execute(
                    "INSERT INTO key_conflicts VALUES (?,?,?,1,?) ON CONFLICT(gateway, claimed_by)"
                    " DO UPDATE SET n=n+1, last_ms=excluded.last_ms, bound_to=excluded.bound_to",
                    (gw, source, owner, now),
                )
                continue
            accepted[gw] = pem
        # A gateway leaves a source's set when its key is deleted there: its binding goes too.
        self.db.execute("DELETE FROM gateway_keys WHERE source=?", (source,))
        # Bindings held by expired or retired sources move to this one.
        self.db.executemany("DELETE FROM gateway_keys WHERE gateway=?", [(gw,) for gw in accepted])
        self.db.executemany(
            "INSERT INTO gateway_keys VALUES (?,?,?,?)",
            [(gw, source, pem, now / 1000) for gw, pem in accepted.items()],
        )
        self.db.execute(
            "DELETE FROM key_conflicts WHERE rowid NOT IN"
            " (SELECT rowid FROM key_conflicts ORDER BY last_ms DESC LIMIT ?)",
            (MAX_CONFLICTS,),
        )
        out.taken = len(accepted)
        return out

    def keys_for(self, gateway: str, received_ms: int, ttl_ms: int) -> list[str]:
        """The key vouched for ``gateway`` by its bound source, if that source's key set was
        live when the row was received (``received_ms``)."""
        return [
            pem
            for (pem,) in self.db.execute(
                "SELECT k.pem FROM gateway_keys k JOIN key_sources s ON s.source=k.source"
                " WHERE k.gateway=? AND s.retired=0 AND s.seen_ms + ? >= ?",
                (gateway, ttl_ms, received_ms),
            )
        ]

    def retire(self, source: str, undo: bool = False) -> int:
        """Retire a syndic (its keys stop verifying, its key sets are refused) or, with
        ``undo``, trust it again; returns how many gateway keys it vouched for."""
        n = self.db.execute(
            "SELECT COUNT(*) FROM gateway_keys WHERE source=?", (source,)
        ).fetchone()[0]
        if undo:
            self.db.execute("UPDATE key_sources SET retired=0, ts_ms=0 WHERE source=?", (source,))
            return n
        self.db.execute(
            "INSERT INTO key_sources (source, ts_ms, seen_ms, retired) VALUES (?,0,0,1)"
            " ON CONFLICT(source) DO UPDATE SET retired=1",
            (source,),
        )
        self.db.execute("DELETE FROM gateway_keys WHERE source=?", (source,))
        return n

    def sources(self, ttl_ms: int) -> dict[str, dict[str, Any]]:
        """Per key source: gateways vouched for, age of its last set, state."""
        now = now_ms()
        counts = dict(self.db.execute("SELECT source, COUNT(*) FROM gateway_keys GROUP BY source"))
        out = {}
        for source, seen_ms, retired in self.db.execute(
            "SELECT source, seen_ms, retired FROM key_sources ORDER BY source"
        ):
            state = "retired" if retired else ("live" if seen_ms + ttl_ms >= now else "expired")
            out[source] = {
                "gateways": counts.get(source, 0),
                "state": state,
                "last_set_age_s": round((now - seen_ms) / 1000, 1) if seen_ms else None,
            }
        return out

    def conflicts(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent conflicts: a syndic claiming a gateway bound elsewhere."""
        return [
            {"gateway": g, "claimed_by": c, "bound_to": b, "times": n, "last_ms": t}
            for g, c, b, n, t in self.db.execute(
                "SELECT gateway, claimed_by, bound_to, n, last_ms FROM key_conflicts"
                " ORDER BY last_ms DESC LIMIT ?",
                (limit,),
            )
        ]
