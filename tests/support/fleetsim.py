"""A simulated fleet: N gateways without N processes, on real syndic masters' event buses.

Shared by ``bench/fleet.py`` (2,000 gateways behind 4 syndics) and
``tests/integration/test_fleet.py`` (a smaller fleet on the session topology). What is real and
what is simulated:

* each gateway id has its own RSA 2048 key pair (Salt's minion key size; cached on disk by
  :func:`gateway_keys`, since 2,000 take minutes to generate), and its public key is written
  where Salt keeps a master's *accepted* minion keys (``<pki_dir>/minions/<id>``,
  :func:`accept`) on its syndic master: the ``tributary_keys`` engine there publishes it in
  its signed key set and the relay verifies every batch against it, as for a real gateway;
* batches are built and signed by the product's own code (``wire.encode_batch``, the beacon's
  ``finalize_batch``), heartbeats by the health beacon's ``health.event`` + ``sign_event``,
  and fired on the syndic master's event bus under the tags and with the data a minion's
  beacon puts there (``salt/beacon/<id>/tributary_mqtt/batch``, Salt's ``id`` field added);
  from there the real salt-syndic (or on Salt 3008 the ``tributary_uplink`` engine) carries
  them to the top master;
* what is *not* there is the minion process: no salt-minion, no MQTT, no gateway spool file.
  The generator keeps each gateway's recent rows in memory instead, and :class:`SimFleet`
  with ``respond=True`` answers the relay's replay jobs (``tributary.replay`` published from
  the top master through salt-syndic to the syndic master) on the syndic master's side: it
  sees the job's ``salt/job/<jid>/new`` event on that master's bus, re-encodes the asked
  range with a ``replay`` request id as ``gateway.operations.replay_batches`` does, fires the
  batches under ``salt/beacon/<id>/tributary_replay/batch`` and then the job return
  ``salt/job/<jid>/ret/<id>`` as the master's ``_return`` fires it, which salt-syndic (or the
  uplink) carries up to the waiting LocalClient.

API (what the scale-out bench may reuse)::

    fleet = SimFleet({"syndic-1": master_opts, ...}, gateways_per_syndic=500, sensors=10,
                     batch_every_s=10.0, key_dir=KEY_DIR)
    fleet.accept_all()       # write the public keys into each syndic master's pki_dir/minions
    fleet.start()            # one firing thread per syndic master (+ responders)
    fleet.set_rate(5.0)      # seconds between one gateway's batches
    fleet.withhold(ids)      # each named gateway's next batch is lost in transit
    fleet.stop(); fleet.counts(); fleet.revoke_all()
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: where generated gateway key pairs are kept between runs (git-ignored)
KEY_DIR = Path(__file__).resolve().parents[2] / ".run" / "fleet-keys"
JOB_NEW_RE = re.compile(r"^salt/job/(?P<jid>\d+)/new$")
#: rows a replayed batch carries at most (a real gateway caps batches by bytes)
REPLAY_ROWS = 500


def _make_key(folder: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    os.makedirs(folder, exist_ok=True)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tmp = os.path.join(folder, "minion.pem.tmp")
    with open(tmp, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    with open(os.path.join(folder, "minion.pub"), "wb") as fh:
        fh.write(pub)
    os.replace(tmp, os.path.join(folder, "minion.pem"))
    return pub.decode()


def gateway_keys(ids: Iterable[str], key_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``{id: pki_dir}``, each pki_dir holding ``minion.pem`` / ``minion.pub`` of a key pair
    of its own (RSA 2048), generated into ``key_dir`` (two processes) unless already there."""
    root = Path(key_dir)
    out = {gw: str(root / gw) for gw in ids}
    missing = [d for d in out.values() if not os.path.exists(os.path.join(d, "minion.pem"))]
    if missing:
        log.info("generating %d gateway key pairs into %s", len(missing), root)
        with ProcessPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
            list(pool.map(_make_key, missing, chunksize=16))
    return out


def gateway_ids(syndics: Iterable[str], per_syndic: int, prefix: str = "sim") -> dict[str, str]:
    """``{gateway id: syndic id}``: ``per_syndic`` gateways per syndic, ids unique fleet-wide
    (``<prefix>-<syndic index>-<n>``)."""
    out = {}
    for s, syndic in enumerate(syndics):
        for n in range(per_syndic):
            out[f"{prefix}-{s}-{n:04d}"] = syndic
    return out


@dataclass
class SimGateway:
    """One simulated gateway: its identity, where it sits, its sequence and recent rows."""

    id: str
    syndic: str
    site: str
    pki_dir: str
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    seq: int = 0  # last sequence number numbered (and fired, unless withheld)
    fired: int = 0  # readings fired in batches (not counting replays)
    batches: int = 0
    withheld: int = 0  # readings lost on purpose (withhold)
    lose_next: bool = False
    due: float = 0.0
    #: recent rows, for replay: (seq, key, ts_ms, value), oldest dropped past ``retain``
    rows: deque = field(default_factory=deque)


class SimFleet:
    """Simulated gateways firing signed batches on their syndic masters' buses."""

    def __init__(
        self,
        masters: Mapping[str, Mapping[str, Any]],
        gateways: Mapping[str, str] | None = None,
        *,
        gateways_per_syndic: int = 0,
        sensors: int = 10,
        batch_every_s: float = 10.0,
        heartbeat_every_s: float | None = 60.0,
        key_dir: str | os.PathLike[str] = KEY_DIR,
        sites_per_syndic: int = 10,
        prefix: str = "sim",
        respond: bool = True,
        retain: int = 20_000,
        beacon: str = "tributary_mqtt",
    ) -> None:
        """``masters``: syndic id -> that syndic master's config (``sock_dir``, ``pki_dir``,
        as ``salt.config.master_config`` or a salt-factories master's ``.config`` has it).
        ``gateways``: gateway id -> syndic id (default: :func:`gateway_ids` with
        ``gateways_per_syndic``). Each gateway reads ``sensors`` sensors once per batch, so a
        gateway sends ``sensors / batch_every_s`` readings/s."""
        self.masters = dict(masters)
        if gateways is None:
            gateways = gateway_ids(self.masters, gateways_per_syndic, prefix)
        self.sensors = sensors
        self.batch_every_s = float(batch_every_s)
        self.heartbeat_every_s = heartbeat_every_s
        self.respond = respond
        self.retain = retain
        self.beacon = beacon
        keys = gateway_keys(gateways, key_dir)
        self.gateways: dict[str, SimGateway] = {}
        per: dict[str, int] = {}
        for gw, syndic in gateways.items():
            n = per.get(syndic, 0)
            per[syndic] = n + 1
            s = list(self.masters).index(syndic)
            site = f"{prefix}-site-{s}-{n % sites_per_syndic}"
            self.gateways[gw] = SimGateway(gw, syndic, site, keys[gw])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._quiet = threading.Event()  # firing stopped, responders still answering
        self._firing: list[threading.Thread] = []
        self._threads: list[threading.Thread] = []
        self.lag_max_s = 0.0  # how far behind schedule a firing thread ever was
        self._lag_now: dict[str, float] = {}  # each firing thread's lag at its last event
        self.replays: list[dict[str, Any]] = []  # answered replay jobs
        self.errors: list[str] = []
        self.heartbeats = 0

    # -- keys --------------------------------------------------------------------------
    def pubkey(self, gw: str) -> str:
        return Path(self.gateways[gw].pki_dir, "minion.pub").read_text()

    def accept_all(self) -> None:
        """Write each gateway's public key where its syndic master keeps accepted keys."""
        for syndic, opts in self.masters.items():
            folder = Path(opts["pki_dir"], "minions")
            folder.mkdir(parents=True, exist_ok=True)
            for g in self.of(syndic):
                (folder / g.id).write_text(self.pubkey(g.id))

    def revoke_all(self) -> None:
        """Remove the keys :meth:`accept_all` wrote."""
        for syndic, opts in self.masters.items():
            for g in self.of(syndic):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(opts["pki_dir"], "minions", g.id))

    def of(self, syndic: str) -> list[SimGateway]:
        return [g for g in self.gateways.values() if g.syndic == syndic]

    # -- batches -----------------------------------------------------------------------
    def next_batch(self, g: SimGateway, now_ms: int) -> dict[str, Any]:
        """The gateway's next batch: ``sensors`` new readings, encoded and signed by the
        product's code (as the ``tributary_mqtt`` beacon emits it)."""
        from saltext.tributary.protocol.wire import SpooledReading, encode_batch

        rows = []
        for i in range(self.sensors):
            seq = g.seq + 1 + i
            value = round(20 + (seq * 7 % 300) / 10, 1)
            ts = now_ms - (self.sensors - i)
            rows.append(SpooledReading(seq, f"s{i}/temperature", "C", ts, value))
        g.seq += self.sensors
        for r in rows:
            g.rows.append((r.seq, r.key, r.ts_ms, r.value))
        while len(g.rows) > self.retain:
            g.rows.popleft()
        batch = encode_batch(g.epoch, rows, site=g.site)
        return self._finish(g, batch)

    def _finish(self, g: SimGateway, batch: dict[str, Any]) -> dict[str, Any]:
        from saltext.tributary.gateway.beacons import finalize_batch

        batch = finalize_batch(batch, {"id": g.id, "pki_dir": g.pki_dir})
        batch["id"] = g.id  # what Salt's beacon processing adds (an unsigned field)
        return batch

    def heartbeat(self, g: SimGateway, now_ms: int) -> dict[str, Any]:
        """A signed heartbeat as the ``tributary_health`` beacon builds it."""
        from saltext.tributary.gateway.sources import health
        from saltext.tributary.protocol import signing

        metrics = {
            "cpu_temp_c": 48.5,
            "load1": 0.2,
            "mem_used_pct": 41.4,
            "disk_used_pct": 35.5,
            "uptime_s": 86_400.0,
            "spool_unsent": 0,
            "spool_held": 0,
            "dropped": 0,
            "counters": {"received": g.seq, "spooled": g.seq, "emitted": g.seq, "filtered": 0},
            "numbered_seq": g.seq,
            "broker": "connected",
        }
        hb = health.event(g.epoch, g.seq, metrics, now_ms)
        hb["site"] = g.site
        hb.pop("tag", None)
        signing.sign_event(hb, {"id": g.id, "pki_dir": g.pki_dir})
        hb["id"] = g.id
        return hb

    def replay_batches(self, g: SimGateway, epoch: str, lo: int, hi: int) -> list[dict] | str:
        """The batches a gateway's ``tributary.replay`` re-emits for ``lo..hi`` (a request id
        in each), or the error it answers when the range is not held."""
        from saltext.tributary.protocol.wire import SpooledReading, encode_batch

        with self._lock:
            held = [r for r in g.rows if lo <= r[0] <= hi]
            oldest = g.rows[0][0] if g.rows else None
        if epoch != g.epoch:
            return f"unknown epoch {epoch}"
        if not held or held[0][0] != lo or held[-1][0] != hi or len(held) != hi - lo + 1:
            return f"range {lo}..{hi} not held (oldest held: {oldest})"
        request = uuid.uuid4().hex[:8]
        out = []
        for i in range(0, len(held), REPLAY_ROWS):
            rows = [SpooledReading(s, k, "C", t, v) for s, k, t, v in held[i : i + REPLAY_ROWS]]
            b = encode_batch(g.epoch, rows, site=g.site)
            b["replay"] = request
            out.append(self._finish(g, b))
        return out

    # -- control -----------------------------------------------------------------------
    def set_rate(self, batch_every_s: float) -> None:
        """Seconds between one gateway's batches from now on."""
        self.batch_every_s = float(batch_every_s)

    def withhold(self, ids: Iterable[str]) -> None:
        """Each named gateway's next batch is numbered but not fired (lost in transit); its
        rows stay held for replay."""
        with self._lock:
            for gw in ids:
                self.gateways[gw].lose_next = True

    def load_keys(self) -> None:
        """Put every gateway's private key in the signing module's key cache now.

        The product parses a gateway's key once, when its beacon first signs (a real gateway
        has one key; cryptography's RSA consistency check costs about 37 ms of CPU per key
        here). 2,000 of them parsed inside the firing threads cost over a minute of CPU and
        put the generator that far behind its schedule. The keys are the ones
        :func:`gateway_keys` generated, so they are parsed here without that check, before
        the schedule starts."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from saltext.tributary.protocol import signing

        for g in self.gateways.values():
            path = signing.minion_key_path({"pki_dir": g.pki_dir})
            with open(path, "rb") as fh:
                key = load_pem_private_key(
                    fh.read(), password=None, unsafe_skip_rsa_key_validation=True
                )
            with signing._key_lock:
                signing._private_keys[path] = (os.stat(path).st_mtime, key)

    def start(self) -> None:
        self.load_keys()
        self._stop.clear()
        self._quiet.clear()
        now = time.monotonic()
        n = len(self.gateways)
        for i, g in enumerate(self.gateways.values()):
            g.due = now + self.batch_every_s * i / max(n, 1)  # spread over one interval
        for syndic, opts in self.masters.items():
            t = threading.Thread(
                target=self._fire_loop, args=(syndic, opts), name=f"fleetsim-{syndic}", daemon=True
            )
            t.start()
            self._threads.append(t)
            self._firing.append(t)
            if self.respond:
                r = threading.Thread(
                    target=self._respond_loop,
                    args=(syndic, opts),
                    name=f"fleetsim-replay-{syndic}",
                    daemon=True,
                )
                r.start()
                self._threads.append(r)

    def quiet(self, final_heartbeat: bool = True) -> None:
        """Stop firing new batches; replay jobs are still answered until :meth:`stop`. With
        ``final_heartbeat`` each gateway then sends one more heartbeat (its last sequence), as
        a live gateway keeps doing, so the relay can see and repair a lost tail."""
        self._quiet.set()
        for t in self._firing:
            t.join(timeout=30)
        self._firing = []
        if final_heartbeat and self.heartbeat_every_s:
            for syndic, opts in self.masters.items():
                with self._bus(opts, listen=False) as bus:
                    for g in self.of(syndic):
                        ms = int(time.time() * 1000)
                        with self._lock:
                            beat = self.heartbeat(g, ms)
                            self.heartbeats += 1
                        self._fire(bus, beat, f"salt/beacon/{g.id}/tributary_health/health")

    def stop(self) -> None:
        self._quiet.set()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []

    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def counts(self) -> dict[str, Any]:
        """Readings and batches fired (replays not counted) and numbered, fleet-wide and per
        gateway: ``expected[gw]`` is what Elasticsearch must hold once gaps are repaired."""
        with self._lock:
            gws = list(self.gateways.values())
            return {
                "gateways": len(gws),
                "batches": sum(g.batches for g in gws),
                "readings_fired": sum(g.fired for g in gws),
                "readings_withheld": sum(g.withheld for g in gws),
                "readings_numbered": sum(g.seq for g in gws),
                "heartbeats": self.heartbeats,
                "replays_answered": len(self.replays),
                "lag_max_s": round(self.lag_max_s, 3),
                "errors": list(self.errors[-5:]),
                "expected": {g.id: g.seq for g in gws},
            }

    def lag_s(self) -> float:
        """How far behind its schedule the most lagging firing thread is now (0: on time)."""
        return max(self._lag_now.values(), default=0.0)

    # -- threads -----------------------------------------------------------------------
    def _bus(self, opts: Mapping[str, Any], listen: bool) -> Any:
        import salt.utils.event

        return salt.utils.event.get_master_event(dict(opts), opts["sock_dir"], listen=listen)

    def _fire_loop(self, syndic: str, opts: Mapping[str, Any]) -> None:
        gws = self.of(syndic)
        tag = f"salt/beacon/{{}}/{self.beacon}/batch"
        hb_tag = "salt/beacon/{}/tributary_health/health"
        now = time.monotonic()
        # (due, kind, index): kind 0 a batch, 1 a heartbeat; heartbeats spread like batches
        heap = [(g.due, 0, i) for i, g in enumerate(gws)]
        if self.heartbeat_every_s:
            hb = self.heartbeat_every_s
            heap += [(now + hb * (i + 0.5) / len(gws), 1, i) for i in range(len(gws))]
        heapq.heapify(heap)
        with self._bus(opts, listen=False) as bus:
            while not self._quiet.is_set() and heap:
                now = time.monotonic()
                if heap[0][0] > now:
                    self._lag_now[syndic] = 0.0  # caught up
                    # wake in small rounds: what fell due meanwhile goes out together
                    self._quiet.wait(max(0.005, heap[0][0] - now))
                    continue
                due, kind, i = heapq.heappop(heap)
                g = gws[i]
                self.lag_max_s = max(self.lag_max_s, now - due)
                self._lag_now[syndic] = now - due
                ms = int(time.time() * 1000)
                if kind == 1:
                    with self._lock:
                        beat = self.heartbeat(g, ms)
                        self.heartbeats += 1
                    self._fire(bus, beat, hb_tag.format(g.id))
                    heapq.heappush(heap, (max(due + float(self.heartbeat_every_s or 0), now), 1, i))
                    continue
                nxt = due + self.batch_every_s
                g.due = nxt if nxt > now - self.batch_every_s else now + self.batch_every_s
                heapq.heappush(heap, (g.due, 0, i))
                with self._lock:
                    batch = self.next_batch(g, ms)
                    lose, g.lose_next = g.lose_next, False
                    if lose:
                        g.withheld += self.sensors
                    else:
                        g.fired += self.sensors
                        g.batches += 1
                if not lose:
                    self._fire(bus, batch, tag.format(g.id))

    def _fire(self, bus: Any, data: dict[str, Any], tag: str) -> None:
        try:
            bus.fire_event(data, tag)
        except Exception as exc:  # counted: the bench reports it
            self.errors.append(f"fire {tag}: {exc}")

    def _respond_loop(self, syndic: str, opts: Mapping[str, Any]) -> None:
        mine = {g.id: g for g in self.of(syndic)}
        with self._bus(opts, listen=True) as bus:
            while not self._stop.is_set():
                ev = bus.get_event(wait=0.2, full=True, auto_reconnect=True)
                if not ev:
                    continue
                m = JOB_NEW_RE.match(ev.get("tag", ""))
                data = ev.get("data") or {}
                if m is None or data.get("fun") != "tributary.replay":
                    continue
                tgt = data.get("tgt")
                targets = tgt if isinstance(tgt, list) else [tgt]
                for gw in targets:
                    g = mine.get(str(gw))
                    if g is not None:
                        try:
                            self._answer(bus, g, m.group("jid"), list(data.get("arg") or []))
                        except Exception as exc:
                            self.errors.append(f"replay {gw}: {exc}")

    def _answer(self, bus: Any, g: SimGateway, jid: str, args: list[Any]) -> None:
        from saltext.tributary.protocol.wire import row_count

        epoch, lo, hi = str(args[0]), int(args[1]), int(args[2])
        batches = self.replay_batches(g, epoch, lo, hi)
        if isinstance(batches, str):
            ret: dict[str, Any] = {"result": False, "error": batches}
        else:
            for b in batches:
                bus.fire_event(b, f"salt/beacon/{g.id}/tributary_replay/batch")
            ret = {
                "result": True,
                "epoch": epoch,
                "batches": len(batches),
                "readings": sum(row_count(b) for b in batches),
            }
        load = {
            "cmd": "_return",
            "id": g.id,
            "jid": jid,
            "fun": "tributary.replay",
            "fun_args": args,
            "return": ret,
            "retcode": 0,
            "success": True,
        }
        bus.fire_event(load, f"salt/job/{jid}/ret/{g.id}")
        with self._lock:
            self.replays.append({"gateway": g.id, "jid": jid, "lo": lo, "hi": hi, **ret})


@contextlib.contextmanager
def running_fleet(*args: Any, **kwargs: Any) -> Iterator[SimFleet]:
    """A :class:`SimFleet` with its keys accepted, started; stopped and its keys removed on
    the way out."""
    fleet = SimFleet(*args, **kwargs)
    fleet.accept_all()
    try:
        with fleet:
            yield fleet
    finally:
        fleet.revoke_all()
