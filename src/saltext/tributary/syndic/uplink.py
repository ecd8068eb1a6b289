"""The uplink: what a syndic master forwards to the top master when salt-syndic cannot.

Salt 3008.5's salt-syndic forwards neither events nor, after the first, job returns (see
README, "Versions tested"). The ``tributary_uplink`` engine runs on each syndic master, reads
its event bus and carries to the top master, over a request channel of its own authenticated
with the syndic's identity (the key the top master accepted for the syndic):

* Tributary events: gateway batches and heartbeats (``salt/beacon/<gw>/tributary_*/...``) and
  the key sets of ``tributary_keys`` (``tributary/keys/<syndic>``), as ``_minion_event``
  requests, so they reach the top master's bus under their own tags as salt-syndic would put
  them there (the relay verifies each batch's gateway signature, whoever carried it);
* job returns (``salt/job/<jid>/ret/<minion>``), as ``_syndic_return`` requests, so replay
  answers and commands targeted from the top master (``salt -G site:x ...``) get their returns.

This module is the pure part: which events are taken, how they are queued (bounded: past
``max_queue`` the oldest are dropped and counted; gap repair recovers dropped batches) and how
they are grouped into requests. The engine does the I/O.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EVENT_RE = re.compile(r"^(salt/beacon/[^/]+/tributary_[A-Za-z0-9_]+/[^/]+|tributary/keys/[^/]+)$")
RETURN_RE = re.compile(r"^salt/job/(?P<jid>\d+)/ret/(?P<minion>[^/]+)$")
#: what a job return carries up, as salt-syndic's own forwarding keeps it
RETURN_KEYS = ("return", "retcode", "success", "fun_args", "out")

DEFAULTS: dict[str, Any] = {
    "returns": True,
    "max_queue": 20_000,
    "batch": 200,
    "timeout_s": 30,
    "backoff": {"min_s": 0.5, "max_s": 30},
}


def _positive(value: Any, integer: bool) -> bool:
    kinds = (int,) if integer else (int, float)
    return not isinstance(value, bool) and isinstance(value, kinds) and value > 0


def validate(config: Any) -> tuple[bool, str]:
    """Validate the ``tributary_uplink`` engine config; never raises."""
    try:
        if not isinstance(config, Mapping):
            return False, "tributary_uplink: configuration must be a mapping"
        errors = []
        known = {*DEFAULTS, "minion_config", "master", "master_port"}
        errors += [f"{k}: unknown option" for k in config if k not in known]
        if not isinstance(config.get("returns", True), bool):
            errors.append("returns: must be true or false")
        for key in ("max_queue", "batch", "master_port"):
            if key in config and not _positive(config[key], integer=True):
                errors.append(f"{key}: must be a positive integer")
        if "timeout_s" in config and not _positive(config["timeout_s"], integer=False):
            errors.append("timeout_s: must be a positive number")
        for key in ("minion_config", "master"):
            if key in config and not isinstance(config[key], str):
                errors.append(f"{key}: must be a string")
        backoff = config.get("backoff", {})
        if not isinstance(backoff, Mapping):
            errors.append("backoff: must be a mapping (min_s, max_s)")
        else:
            errors += [
                f"backoff.{k}: unknown option" for k in backoff if k not in ("min_s", "max_s")
            ]
            for key in ("min_s", "max_s"):
                if key in backoff and not _positive(backoff[key], integer=False):
                    errors.append(f"backoff.{key}: must be a positive number")
        if errors:
            return False, "tributary_uplink: " + "; ".join(errors)
        return True, "valid"
    except Exception as exc:  # validate() never raises
        return False, f"tributary_uplink: invalid configuration: {exc}"


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its defaults filled in (after :func:`validate`)."""
    out = {**DEFAULTS, **config}
    out["backoff"] = {**DEFAULTS["backoff"], **(config.get("backoff") or {})}
    return out


@dataclass
class Uplink:
    """Bounded queues of events and job returns waiting to go up, grouped into requests."""

    syndic_id: str
    max_queue: int = 20_000
    batch: int = 200
    returns: bool = True
    events: deque = field(default_factory=deque)
    rets: OrderedDict = field(default_factory=OrderedDict)
    counters: dict[str, int] = field(default_factory=dict)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def take(self, tag: str, data: Any) -> bool:
        """Queue one bus event if it goes up; True if it was taken."""
        if not isinstance(tag, str) or not isinstance(data, Mapping):
            return False
        if EVENT_RE.match(tag):
            self.events.append({"tag": tag, "data": dict(data)})
            self._count("events_taken")
            while len(self.events) > self.max_queue:
                self.events.popleft()
                self._count("events_dropped")
            return True
        m = RETURN_RE.match(tag)
        if m is None or not self.returns or "return" not in data or "jid" not in data:
            return False
        jid, minion = m.group("jid"), m.group("minion")
        load = self.rets.get(jid)
        if load is None:
            load = self.rets[jid] = {"id": self.syndic_id, "jid": jid, "return": {}}
            if data.get("fun") is not None:
                load["fun"] = data["fun"]
            if data.get("master_id") is not None:
                load["master_id"] = data["master_id"]
        load["return"][minion] = {k: data[k] for k in RETURN_KEYS if k in data}
        self._count("returns_taken")
        while len(self.rets) > self.max_queue:
            self.rets.popitem(last=False)
            self._count("returns_dropped")
        return True

    def pending(self) -> bool:
        return bool(self.events or self.rets)

    def next_request(self) -> tuple[str, dict[str, Any], int] | None:
        """The next request to send: ``(kind, load, size)``; call :meth:`sent` once the top
        master answered it. Returns go first (a waiting CLI is on the other end)."""
        if self.rets:
            loads = list(self.rets.values())[: self.batch]
            return (
                "returns",
                {"cmd": "_syndic_return", "id": self.syndic_id, "load": loads},
                len(loads),
            )
        if self.events:
            events = [self.events[i] for i in range(min(self.batch, len(self.events)))]
            load = {"cmd": "_minion_event", "id": self.syndic_id, "events": events, "pretag": None}
            return "events", load, len(events)
        return None

    def sent(self, kind: str, size: int) -> None:
        """The request of ``kind`` carrying the first ``size`` queued items was answered."""
        if kind == "returns":
            for _ in range(min(size, len(self.rets))):
                self.rets.popitem(last=False)
            self._count("returns_sent", size)
        else:
            for _ in range(min(size, len(self.events))):
                self.events.popleft()
            self._count("events_sent", size)
