"""The uplink: what a syndic master forwards to the top master when salt-syndic cannot.

Salt 3008.5's salt-syndic forwards neither events nor, after the first, job returns (see
README, "Versions tested"). The ``tributary_uplink`` engine runs on each syndic master, reads
its event bus and carries to the top master, over a request channel of its own authenticated
with the syndic's identity (the key the top master accepted for the syndic):

* Tributary events: gateway batches and heartbeats (``salt/beacon/<gw>/tributary_*/...``),
  the key sets of ``tributary_keys`` (``tributary/keys/<syndic>``) and a syndic relay's
  receipts (``tributary/receipt/<syndic>``, scale-out), as ``_minion_event``
  requests, so they reach the top master's bus under their own tags as salt-syndic would put
  them there (the relay verifies each batch's gateway signature, whoever carried it);
* job returns (``salt/job/<jid>/ret/<minion>``), as ``_syndic_return`` requests, so replay
  answers and commands targeted from the top master (``salt -G site:x ...``) get their returns;
* with them, each job's list of targeted minions (``salt/job/<jid>/new``), as salt-syndic
  forwards it: a ``_minion_event`` tagged ``syndic/<syndic id>/salt/job/<jid>/new``, so the
  top master knows whom to wait for (its ``salt`` CLI and runners stop once those answered, after
  ``syndic_wait``, instead of waiting for their whole timeout) and records them in its job
  cache.

This module is the pure part: which events are taken, how they are queued (bounded: past
``max_queue`` the oldest are dropped and counted; gap repair recovers dropped batches) and how
they are grouped into requests. The engine does the I/O.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.util import schema
from saltext.tributary.util.schema import Backoff, option

EVENT_RE = re.compile(
    r"^(salt/beacon/[^/]+/tributary_[A-Za-z0-9_]+/[^/]+|tributary/(?:keys|receipt)/[^/]+)$"
)
log = logging.getLogger(__name__)
RETURN_RE = re.compile(r"^salt/job/(?P<jid>\d+)/ret/(?P<minion>[^/]+)$")
NEW_JOB_RE = re.compile(r"^salt/job/\d+/new$")
#: what a job return carries up, as salt-syndic's own forwarding keeps it
RETURN_KEYS = ("return", "retcode", "success", "fun_args", "out")


@dataclass(frozen=True)
class UplinkConfig:
    """The ``tributary_uplink`` engine's configuration, under its YAML names."""

    returns: bool = option(True, doc="forward job returns too")
    max_queue: int = option(20_000, range=(1, 10_000_000), doc="items held while the top is away")
    batch: int = option(200, range=(1, 10_000), doc="events per request")
    timeout_s: float = option(30.0, range=(0.1, 3600), doc="per request")
    backoff: Backoff = option(Backoff)
    minion_config: str | None = option(None, doc="the syndic's minion config (id, pki_dir)")
    master: str | list[str] | None = option(None, doc="default: syndic_master (one or a list)")
    master_port: int | None = option(None, range=(1, 65535), doc="default: syndic_master_port")


def parse_uplink(config: Any) -> tuple[UplinkConfig | None, list[str]]:
    return schema.parse_loader_config(UplinkConfig, config)


def validate(config: Any) -> tuple[bool, str]:
    """Validate the ``tributary_uplink`` engine config; never raises."""
    return schema.verdict("tributary_uplink", parse_uplink, config)


@dataclass
class Uplink:
    """Bounded queues of events and job returns waiting to go up, grouped into requests."""

    syndic_id: str
    max_queue: int = 20_000
    batch: int = 200
    returns: bool = True
    #: with several top masters, one Uplink each: a job return whose ``master_id`` names
    #: another master is left to that master's Uplink (a return without one goes to all)
    master_id: str | None = None
    events: deque = field(default_factory=deque)
    #: ``salt/job/<jid>/new`` events (who a job targets), sent as ``syndic/<id>/salt/job/...``
    jobs: deque = field(default_factory=deque)
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
        if NEW_JOB_RE.match(tag):
            if not self.returns or not isinstance(data.get("minions"), list) or "retcode" in data:
                return False
            owner = data.get("master_id")
            if owner is not None and self.master_id is not None and owner != self.master_id:
                return False
            self.jobs.append({"tag": tag, "data": dict(data)})
            self._count("jobs_taken")
            while len(self.jobs) > self.max_queue:
                self.jobs.popleft()
                self._count("jobs_dropped")
            return True
        m = RETURN_RE.match(tag)
        if m is None or not self.returns or "return" not in data or "jid" not in data:
            return False
        owner = data.get("master_id")
        if owner is not None and self.master_id is not None and owner != self.master_id:
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
        return bool(self.events or self.jobs or self.rets)

    def next_request(self) -> tuple[str, dict[str, Any], int] | None:
        """The next request to send: ``(kind, load, size)``; call :meth:`sent` once the top
        master answered it. Jobs' minion lists and returns go first (a waiting CLI is on the
        other end)."""
        if self.jobs:
            # tagged as salt-syndic's pretag puts them on the top master's bus; sent already
            # prefixed, since a pretag also fires the bare salt/job/... tag, which the master
            # refuses from a minion with a warning each time
            prefix = f"syndic/{self.syndic_id}/"
            jobs = [
                {"tag": prefix + self.jobs[i]["tag"], "data": self.jobs[i]["data"]}
                for i in range(min(self.batch, len(self.jobs)))
            ]
            jobs_load: dict[str, Any] = {
                "cmd": "_minion_event",
                "id": self.syndic_id,
                "events": jobs,
                "pretag": None,
            }
            return "jobs", jobs_load, len(jobs)
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
        elif kind == "jobs":
            for _ in range(min(size, len(self.jobs))):
                self.jobs.popleft()
            self._count("jobs_sent", size)
        else:
            for _ in range(min(size, len(self.events))):
                self.events.popleft()
            self._count("events_sent", size)


class Link:
    """One top master: its queue, its request channel, its backoff."""

    def __init__(
        self,
        entry: str,
        opts: Mapping[str, Any],
        cfg: UplinkConfig,
        channel_factory: Callable[[Mapping[str, Any]], Any],
        several: bool = False,
    ) -> None:
        self.entry, self.opts, self.cfg = entry, opts, cfg
        self.channel_factory = channel_factory
        self.uri = opts.get("master_uri", entry)
        self.up = Uplink(
            opts["id"],
            max_queue=cfg.max_queue,
            batch=cfg.batch,
            returns=cfg.returns,
            master_id=entry if several else None,
        )
        self.channel: Any = None
        self.delay = 0.0
        self.next_try = 0.0

    def flush(self) -> None:
        """Send what is queued until the master fails to answer (then back off)."""
        while time.monotonic() >= self.next_try:
            request = self.up.next_request()
            if request is None:
                return
            kind, load, size = request
            try:
                if self.channel is None:
                    self.channel = self.channel_factory(self.opts)
                self.channel.send(load, timeout=self.cfg.timeout_s, tries=1)
            except Exception as exc:  # a failed request is retried with backoff
                backoff = self.cfg.backoff
                self.delay = min(max(self.delay * 2, backoff.min_s), backoff.max_s)
                self.next_try = time.monotonic() + self.delay
                log.warning(
                    "tributary_uplink: %s to %s failed (%s); retrying in %.1f s",
                    kind,
                    self.uri,
                    exc,
                    self.delay,
                )
                if self.channel is not None:
                    self.channel.close()
                    self.channel = None
                return
            self.up.sent(kind, size)
            self.delay = 0.0

    def report_drops(self) -> None:
        c = self.up.counters
        dropped = (
            c.pop("events_dropped", 0) + c.pop("returns_dropped", 0) + c.pop("jobs_dropped", 0)
        )
        if dropped:
            log.error(
                "tributary_uplink: queue for %s past max_queue (%s): dropped the %s oldest"
                " items; the relay's gap repair asks the gateways for lost batches",
                self.entry,
                self.cfg.max_queue,
                dropped,
            )
