"""What the top master does with confirmed readings: the detector, the health layers and the
alert rules, wired together and run in the relay's tap process.

The relay engine starts a :class:`~saltext.tributary.relay.tap.ProcessTap` with :func:`build`
as its factory, so everything here runs in a child process of the engine, off the relay's GIL:
it has its own Elasticsearch client, fires its events on the master bus with its own event
object, and keeps its state in its own SQLite files (``anomalies.state_path``,
``alerts_path``). Counts go back to the relay's counters through ``count``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from saltext.tributary.analysis import detector as analysis_detector
from saltext.tributary.analysis import health as analysis_health
from saltext.tributary.analysis import service as analysis_service
from saltext.tributary.analysis import store as analysis_store
from saltext.tributary.reaction import alerts as reaction_alerts
from saltext.tributary.reaction import rules as reaction_rules
from saltext.tributary.reaction import service as reaction_service
from saltext.tributary.relay import elasticsearch as es_lib
from saltext.tributary.relay import spool as relay_spool
from saltext.tributary.relay import status as relay_status
from saltext.tributary.relay.config import RelayConfig
from saltext.tributary.relay.tap import Confirmed

log = logging.getLogger(__name__)


def wanted(rcfg: RelayConfig) -> bool:
    """Whether the configuration asks for anything to consume confirmed readings."""
    rules, _ = reaction_rules.parse_rules(rcfg.rules)
    return bool(rcfg.anomalies.enabled or rules)


class Consumers:
    """The detector (with the health layers) and the alert rules behind one handler."""

    def __init__(
        self,
        service: analysis_service.AnomalyService | None,
        alerts: reaction_service.AlertService | None,
    ) -> None:
        self.service = service
        self.alerts = alerts

    def handle(self, readings: Sequence[Confirmed]) -> None:
        if self.service is not None:
            self.service.handle(readings)
        if self.alerts is not None:
            self.alerts.readings(readings)

    def tick(self) -> None:
        if self.service is not None:
            self.service.tick()
        if self.alerts is not None:
            self.alerts.tick()

    def close(self) -> None:
        for part in (self.service, self.alerts):
            if part is not None:
                try:
                    part.close()
                except Exception:  # the other part still saves its state
                    log.exception("tributary relay: %s did not close cleanly", type(part).__name__)


def build(
    opts: dict[str, Any],
    es_cfg: dict[str, Any],
    rcfg: RelayConfig,
    count: Callable[..., None],
) -> Consumers:
    """The consumers for ``rcfg``, with their own Elasticsearch client and master bus (the
    :class:`~saltext.tributary.relay.tap.ProcessTap` factory)."""
    import salt.utils.event  # pylint: disable=import-outside-toplevel

    client = es_lib.make_client(es_cfg)
    bus = salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=False)
    # Connect now: the first connection imports Salt's transport and master modules (about
    # 2.6 s of CPU in a py-spy profile of this process), which would otherwise fall on the
    # first anomaly, in the middle of a burst. A failed connect is retried by the first fire.
    try:
        bus.connect_pull(timeout=5)
    except Exception as exc:  # pylint: disable=broad-except
        log.warning("tributary relay: master event bus not connected yet: %s", exc)
    return wire(client, bus.fire_event, rcfg, count)


def wire(
    client: Any,
    fire: Callable[[dict[str, Any], str], Any] | None,
    rcfg: RelayConfig,
    count: Callable[..., None],
) -> Consumers:
    """Detector, health and alerts for ``rcfg``, writing through ``client``, firing with
    ``fire`` and counting with ``count``."""

    def index(kind: str) -> Callable[[int], str]:
        return lambda ts: es_lib.index_name(rcfg.index_prefix, kind, ts, rcfg.daily)

    def bulk(body: str) -> Any:
        return client.bulk(operations=body, refresh=False)

    rules, _ = reaction_rules.parse_rules(rcfg.rules)
    alerts = None
    if rules:
        alerts = reaction_service.AlertService(
            rules,
            reaction_alerts.AlertBook(rcfg.alerts_path),
            bulk,
            fire,
            index("alerts"),
            count,
            facts=heartbeat_facts(rcfg.spool_path),  # grains of the gateways' heartbeats
        )
    service = None
    cfg = rcfg.anomalies
    if cfg.enabled:
        health = None
        if rcfg.health.enabled:
            h = rcfg.health
            fields = analysis_health.HealthConfig.__dataclass_fields__
            health = analysis_health.HealthMonitor(
                analysis_health.HealthConfig(**{k: getattr(h, k) for k in fields}),
                heartbeat_facts(rcfg.spool_path),
                analysis_health.FindingBook(cfg.state_path),
            )
        service = analysis_service.AnomalyService(
            analysis_detector.DetectorConfig(
                threshold=cfg.threshold,
                learn_n=cfg.learn_n,
                quiet_n=cfg.quiet_n,
                rearm_n=cfg.rearm_n,
            ),
            analysis_service.Sinks(bulk=bulk, fire=fire, index=index("anomalies"), count=count),
            analysis_store.ModelStore(cfg.state_path),
            max_series=cfg.max_series,
            persist_s=cfg.persist_s,
            health=health,
            findings_index=index("findings"),
            on_anomaly=alerts.anomaly if alerts else None,
            on_finding=alerts.finding if alerts else None,
            point_interval_s=cfg.point_interval_s,
        )
    return Consumers(service, alerts)


def heartbeat_facts(spool_path: str) -> Callable[[], Any]:
    """``facts()``: the last heartbeat of each gateway, read from the relay spool on the
    caller's thread (its own connection)."""
    local: dict[str, relay_spool.RelaySpool] = {}

    def facts() -> Any:
        if "spool" not in local:
            local["spool"] = relay_spool.RelaySpool(spool_path)
        return relay_status.heartbeat_facts(local["spool"])

    return facts
