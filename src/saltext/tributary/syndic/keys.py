"""What the ``tributary_keys`` engine publishes, and when (runs on a syndic master).

A full key set goes up at start and every ``interval`` seconds. On a key event it goes up
early, but only when the accepted keys really changed, and at most once per ``min_gap_s``: a
minion can fire any tag onto its master's bus (``event.fire_master``), so a look-alike
``salt/key`` event costs one directory read, never a signature in a loop.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from saltext.tributary.protocol import signing
from saltext.tributary.util import schema
from saltext.tributary.util.schema import option

#: The tag Salt's key manager fires on accept, reject and delete.
KEY_TAG = "salt/key"


@dataclass(frozen=True)
class KeysConfig:
    """The ``tributary_keys`` engine's configuration, under its YAML names."""

    interval: float = option(60.0, range=(0.001, 86400 * 365), doc="seconds between publications")
    min_gap_s: float = option(2.0, range=(0.001, 86400), doc="least time between two of them")
    syndic_id: str | None = option(None, doc="default: the syndic's minion id")
    signing_key: str | None = option(
        None, doc="default: <pki_dir>/minion.pem, then /etc/salt/pki/minion/minion.pem"
    )


def parse_keys(config: Any) -> tuple[KeysConfig | None, list[str]]:
    return schema.parse_loader_config(KeysConfig, config)


def validate(config: Any) -> tuple[bool, str]:
    """Validate the ``tributary_keys`` engine config; never raises."""
    return schema.verdict("tributary_keys", parse_keys, config)


class KeyPublisher:
    """Decides when to publish and signs the key set."""

    def __init__(
        self,
        pki_dir: str,
        syndic_id: str,
        key_path: str,
        interval: float = 60.0,
        min_gap_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pki_dir = pki_dir
        self.syndic_id = syndic_id
        self.key_path = key_path
        self.interval = interval
        self.min_gap_s = min_gap_s
        self._clock = clock
        self._last = float("-inf")  # last publication
        self._digest = ""  # of the keys last published
        self._pending = False  # a key event seen, not yet looked at

    def note(self, tag: str | None) -> None:
        """Take one bus event's tag into account."""
        if tag == KEY_TAG:
            self._pending = True

    def next_set(self) -> dict[str, Any] | None:
        """The signed key set to publish now, or None (raises when it cannot be signed)."""
        now = self._clock()
        periodic = now - self._last >= self.interval
        if not periodic and not (self._pending and now - self._last >= self.min_gap_s):
            return None
        keys = signing.read_accepted_keys(self.pki_dir)
        digest = _digest(keys)
        self._pending = False
        if not periodic and digest == self._digest:
            return None  # a look-alike or no-op key event: nothing to say
        data = signing.sign_keyset(self.syndic_id, keys, self.key_path)
        self._last, self._digest = now, digest
        return data

    def retry_soon(self, retry_s: float) -> None:
        """Signing failed (at first start the key may not be written yet): try again in
        ``retry_s`` rather than a whole interval later."""
        self._last = self._clock() - self.interval + min(retry_s, self.interval)


def _digest(keys: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for gw in sorted(keys):
        h.update(gw.encode() + b"\0" + keys[gw].encode() + b"\0")
    return h.hexdigest()
