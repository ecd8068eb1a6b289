"""The relay's in-memory counters, shared by its threads until they are written to the spool.

Fleet counters are keyed by name (``indexed``, ``rejected:bad_signature``); per-gateway ones by
``(name, gateway)`` for the names in :data:`~saltext.tributary.relay.spool.PER_GATEWAY_COUNTERS`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any


class Counters:
    """Thread-safe counts, drained into the spool with the bulk they belong to."""

    def __init__(self) -> None:
        self._counts: Counter[Any] = Counter()
        self._lock = threading.Lock()

    def inc(self, name: str, n: int = 1, gateway: str | None = None) -> None:
        """Count ``n`` under ``name``, for the fleet or, with ``gateway``, for that gateway."""
        with self._lock:
            self._counts[(name, gateway) if gateway else name] += n

    def update(self, counts: Mapping[Any, int]) -> None:
        with self._lock:
            self._counts.update(counts)

    def drain(self) -> dict[Any, int]:
        """Everything counted since the last drain (and forget it)."""
        with self._lock:
            out = dict(self._counts)
            self._counts.clear()
        return out

    def fleet(self) -> dict[str, int]:
        """The fleet counters not yet drained."""
        with self._lock:
            return {k: v for k, v in self._counts.items() if isinstance(k, str)}

    def __getitem__(self, key: Any) -> int:
        with self._lock:
            return self._counts[key]

    def __iter__(self) -> Iterator[Any]:
        with self._lock:
            return iter(list(self._counts))
