"""The one registry of a gateway's long-lived per-beacon objects.

Subscribers, pollers, filters, bandwidth budgets and spool connections outlive a beacon run:
they live here, in a normal Python import that survives Salt reloading the beacon modules
(``saltutil.sync_*``). Each is kept under ``(kind, key)`` with a fingerprint of the config it
was built from; a changed config replaces it (the old one is stopped first: a new MQTT client
must not meet the old one, which has the same client id, on the broker).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any


def fingerprint(config: Any) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _release(obj: Any) -> None:
    for method in ("stop", "close"):
        if callable(getattr(obj, method, None)):
            getattr(obj, method)()
            return


class Registry:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._items: dict[tuple[str, str], tuple[str, Any]] = {}

    def get(self, kind: str, key: str) -> Any | None:
        with self._lock:
            item = self._items.get((kind, key))
        return item[1] if item else None

    def ensure(self, kind: str, key: str, config: Any, build: Callable[[Any], Any]) -> Any:
        """The object for ``(kind, key)``; ``build(previous or None)`` makes it when there is
        none or ``config`` changed (the previous one is released first)."""
        fp = fingerprint(config)
        with self._lock:
            item = self._items.get((kind, key))
            if item is not None and item[0] == fp:
                return item[1]
            if item is not None:
                _release(item[1])
            obj = build(item[1] if item else None)
            self._items[(kind, key)] = (fp, obj)
            return obj

    def drop(self, kind: str, key: str) -> None:
        with self._lock:
            item = self._items.pop((kind, key), None)
        if item is not None:
            _release(item[1])

    def clear(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for _, obj in items:
            _release(obj)
