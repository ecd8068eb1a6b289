"""The ``tributary_relay`` engine configuration: validation and the typed settings."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from saltext.tributary.util import schema
from saltext.tributary.util.schema import Backoff, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BulkConfig:
    max_docs: int = option(5_000, range=(1, 100_000), doc="documents per bulk request")
    max_wait_s: float = option(0.2, range=(0, 3600), doc="how long a bulk waits to fill up")
    concurrency: int = option(2, range=(1, 8), doc="bulks in flight while the next is built")
    max_bytes: int = option(
        10 * 1024**2, range=(64 * 1024, 512 * 1024**2), doc="bytes per bulk request body"
    )
    max_attempts: int = option(
        30, range=(1, 100_000), doc="tries of a document Elasticsearch answers 429/5xx for"
    )


@dataclass(frozen=True)
class GapsConfig:
    enabled: bool = option(True, doc="ask gateways to replay what the ledger shows missing")
    grace_s: float = option(60.0, range=(0, 86400 * 30), doc="a gap open this long is requested")
    check_s: float = option(5.0, range=(0.1, 3600), doc="how often the ledger is looked at")
    backoff_s: float = option(30.0, range=(0, 86400), doc="per gap, doubled per request")
    backoff_max_s: float = option(600.0, range=(0, 86400 * 7), doc="cap of the per-gap backoff")
    per_minute: int = option(6, range=(1, 10_000), doc="replay requests, fleet-wide")
    max_attempts: int = option(
        8, range=(1, 1000), doc="answered replays after which a gap still open is given up"
    )
    give_up_after_s: float = option(
        7 * 86400.0, range=(60, 86400 * 365), doc="unanswered this long: given up (retention)"
    )
    concurrency: int = option(8, range=(1, 256), doc="replay requests in flight (per gateway 1)")
    keep_s: float = option(
        30 * 86400.0, range=(3600, 86400 * 3650), doc="settled epochs and given-up gaps kept"
    )
    max_readings: int = option(20_000, range=(1, 10_000_000), doc="readings per request")
    timeout_s: float = option(60.0, range=(1, 3600), doc="how long a request waits for answers")


@dataclass(frozen=True)
class AnomaliesConfig:
    """The detector fed with confirmed readings (``saltext.tributary.analysis``)."""

    enabled: bool = option(True, doc="score confirmed readings, off the shipping path")
    threshold: float = option(0.1345, range=(0.0, 1.0), doc="score of an anomaly (NAB-tuned)")
    learn_n: int = option(150, range=(10, 10_000_000), doc="points before a series is scored")
    point_interval_s: float = option(
        0.1, range=(0.0, 3600.0), doc="a series' readings this close are one point (0: each)"
    )
    quiet_n: int = option(100, range=(0, 10_000_000), doc="points without a new alert after one")
    rearm_n: int = option(
        20, range=(0, 10_000_000), doc="calm points after which a quiet series alerts again"
    )
    max_series: int = option(100_000, range=(1, 10_000_000), doc="models kept (LRU evicted)")
    queue_batches: int = option(256, range=(1, 100_000), doc="bulks queued for the detector")
    persist_s: float = option(60.0, range=(1, 86400), doc="how often models are saved")
    state_path: str | None = option(None, doc="default: <cachedir>/tributary/analysis.db")


@dataclass(frozen=True)
class HealthConfig:
    """Health findings in three layers (``saltext.tributary.analysis.health``)."""

    enabled: bool = option(True, doc="evaluate device, sensor and site health")
    heartbeat_s: float = option(30.0, range=(1, 86400), doc="the gateways' health beacon interval")
    overdue_factor: float = option(3.0, range=(1, 1000), doc="heartbeats missed: gateway silent")
    silent_factor: float = option(5.0, range=(1, 1000), doc="usual intervals: sensor silent")
    min_silent_s: float = option(60.0, range=(1, 86400 * 7), doc="a sensor is silent no sooner")
    stuck_n: int = option(30, range=(2, 10_000_000), doc="same value this often: sensor stuck")
    skew_s: float = option(120.0, range=(1, 86400), doc="clock further off: clock skew")
    backlog_n: int = option(3, range=(2, 1000), doc="heartbeats of growing backlog")
    outage_min: int = option(2, range=(2, 100_000), doc="silent gateways of a site: outage")
    depart_k: float = option(6.0, range=(1, 1000), doc="MADs from its siblings: sensor departs")
    check_s: float = option(15.0, range=(1, 3600), doc="how often health is evaluated")


@dataclass(frozen=True)
class ScaleoutConfig:
    """Scale-out mode (``saltext.tributary.relay.scaleout``): relays on the syndic masters
    index their own gateways; the top master's relay keeps the ledger and gap repair."""

    role: str = option(
        "single",
        choices=("single", "top", "syndic"),
        doc="single: one relay for the fleet; top: skips gateways a syndic relay owns;"
        " syndic: this relay runs on a syndic master and sends receipts up",
    )
    syndic_relays: list[str] | None = option(
        None, doc="(top) trusted syndics whose own relay indexes the gateways they vouch for"
    )
    takeover_s: float = option(
        60.0, range=(1, 86400), doc="(top) no receipt this long: the top indexes them itself"
    )
    syndic_id: str | None = option(None, doc="(syndic) this syndic's id as the top master knows it")
    signing_key: str | None = option(
        None,
        doc="(syndic) the syndic's minion key; default <pki_dir>/minion.pem, then"
        " /etc/salt/pki/minion/minion.pem",
    )
    receipt_s: float = option(
        5.0, range=(0.5, 3600), doc="(syndic) confirmed ranges go up this often (its liveness)"
    )
    full_receipt_s: float = option(
        300.0, range=(10, 86400), doc="(syndic) every recent range again (heals lost receipts)"
    )
    full_window_s: float = option(
        86400.0, range=(60, 86400 * 30), doc="(syndic) a full receipt covers epochs active so long"
    )


def _hosts(value: Any, key: str) -> tuple[list[str] | None, list[str]]:
    hosts = [value] if isinstance(value, str) else value
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        return None, [f"{key}: a URL or a list of URLs is required"]
    if not all(h.startswith(("http://", "https://")) for h in hosts):
        return None, [f"{key}: each URL must start with http:// or https://"]
    return hosts, []


#: What ``elasticsearch`` must be (the block has no defaults for its hosts).
ES_NOT_A_MAPPING = (
    "elasticsearch: must be a mapping (hosts, username/password or api_key, ca_certs)"
)


@dataclass(frozen=True)
class ElasticsearchConfig:
    """The ``elasticsearch`` block: the client's settings, then the index templates'. The one
    place of their defaults: the engine, :func:`~saltext.tributary.relay.elasticsearch.make_client`
    and the runner's reachability check read them here."""

    hosts: list[str] | None = option(
        None, parser=_hosts, doc="a URL or a list of URLs (http:// or https://)"
    )
    username: str | None = option(None)
    password: str | None = option(None, doc="with username")
    api_key: str | list[str] | None = option(None, doc="instead of username/password")
    ca_certs: str | None = option(None, doc="CA file of an https:// cluster")
    replicas: int = option(1, range=(0, None), doc="number_of_replicas of the index templates")
    shards: int = option(1, range=(0, None), doc="number_of_shards of the index templates")
    refresh_interval: str | None = option(
        None,
        pattern=r"-1|[1-9][0-9]*(ms|s|m|h)",
        pattern_doc="must be a time like 1s, 500ms or 30s, or -1",
        doc="index.refresh_interval of the index templates; default: Elasticsearch's own (1s,"
        " and none while no search has come for 30 s)",
    )
    request_timeout: float = option(30.0, positive=True, doc="seconds per request")
    verify_certs: bool | None = option(None, doc="default: the client's (true)")
    #: the runner's reachability check waits this long when ``request_timeout`` is not set
    probe_timeout: float = field(default=10.0, init=False)

    def problems(self, path: str) -> list[str]:
        """What the credentials say about each other, by key path."""
        errors = []
        if not self.hosts:
            errors.append(f"{path}.hosts: a URL or a list of URLs is required")
        if self.password is not None and not self.username:
            errors.append(f"{path}.username: required with {path}.password")
        if self.api_key is not None and self.username:
            errors.append(f"{path}.api_key: use either api_key or username/password")
        return errors


def parse_elasticsearch(data: Any) -> tuple[ElasticsearchConfig | None, list[str]]:
    """The ``elasticsearch`` block, or every problem with its key path."""
    if not isinstance(data, Mapping):
        return None, [ES_NOT_A_MAPPING]
    return schema.parse(ElasticsearchConfig, data, "elasticsearch")


def es_config(data: ElasticsearchConfig | Mapping[str, Any]) -> ElasticsearchConfig:
    """The parsed ``elasticsearch`` block (a mapping is parsed; raises ValueError naming every
    problem)."""
    if isinstance(data, ElasticsearchConfig):
        return data
    es, errors = parse_elasticsearch(data)
    if es is None:
        raise ValueError("; ".join(errors))
    return es


@dataclass(frozen=True)
class RelayConfig:
    """The ``tributary_relay`` engine's configuration, under its YAML names."""

    elasticsearch: ElasticsearchConfig = option(
        ElasticsearchConfig, doc="hosts, credentials, CA, replicas, shards"
    )
    index_prefix: str = option(
        "tributary",
        pattern=r"[a-z0-9][a-z0-9_-]*",
        pattern_doc="lowercase letters, digits, '-' and '_' only",
    )
    indices: str = option("daily", choices=("daily", "single", "data_stream"))
    spool_path: str | None = option(None, doc="default: <cachedir>/tributary/relay.db")
    spool_max_bytes: int = option(
        2 * 1024**3, range=(1024 * 1024, 2**50), doc="past it the oldest batches are dropped"
    )
    pki_dir: str | None = option(None, doc="the top master's pki_dir (its accepted keys)")
    allow_unsigned: bool = option(False, doc="accept unsigned batches (migrations only)")
    trusted_syndics: list[str] | None = option(
        None, doc="syndic ids whose key sets vouch for gateways (none when unset)"
    )
    keyset_ttl_s: float = option(
        600.0, range=(10, 86400 * 30), doc="a syndic's keys expire this long after its last set"
    )
    key_wait_s: float = option(120.0, range=(0, 86400), doc="a batch waits this for its key")
    metrics_interval_s: float = option(30.0, range=(0, 86400), doc="self-metrics; 0 = off")
    max_future_s: float = option(
        86_400.0, range=(60, 86400 * 365), doc="readings stamped further ahead are dead-lettered"
    )
    max_age_s: float = option(
        86_400.0 * 35,
        range=(3600, 86400 * 3650),
        doc="readings older than this are dead-lettered (no index is created for them)",
    )
    bulk: BulkConfig = option(BulkConfig)
    backoff: Backoff = option(Backoff)
    gaps: GapsConfig = option(GapsConfig)
    anomalies: AnomaliesConfig = option(AnomaliesConfig)
    health: HealthConfig = option(HealthConfig)
    scaleout: ScaleoutConfig = option(ScaleoutConfig)
    #: checked by :func:`saltext.tributary.reaction.rules.parse_rules` (the engine's validate)
    rules: list[dict[str, Any]] | None = option(None, doc="alert rules (README: Alerts)")
    alerts_path: str | None = option(None, doc="default: <cachedir>/tributary/alerts.db")
    #: intake de-duplication window (events); not an option
    dedup_window: int = field(default=20_000, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.elasticsearch, Mapping):  # RelayConfig(elasticsearch={...})
            object.__setattr__(self, "elasticsearch", es_config(self.elasticsearch))

    @property
    def daily(self) -> bool:
        return self.indices == "daily"

    def resolve(self, cachedir: str, pki_dir: str | None = None) -> RelayConfig:
        """The paths that default to where this master keeps its cache and keys."""
        state = self.anomalies.state_path or os.path.join(cachedir, "tributary", "analysis.db")
        return replace(
            self,
            alerts_path=self.alerts_path or os.path.join(cachedir, "tributary", "alerts.db"),
            spool_path=self.spool_path or os.path.join(cachedir, "tributary", "relay.db"),
            pki_dir=self.pki_dir or pki_dir or "/etc/salt/pki/master",
            anomalies=replace(self.anomalies, state_path=state),
        )


def parse_relay(config: Any) -> tuple[RelayConfig | None, list[str]]:
    """The engine config as a :class:`RelayConfig`, or every problem with its key path."""
    cfg, errors = schema.parse_loader_config(RelayConfig, config)
    if not isinstance(config, Mapping):
        return None, errors
    if not isinstance(config.get("elasticsearch"), Mapping):  # it has no default hosts
        errors = [ES_NOT_A_MAPPING] + [e for e in errors if not e.startswith("elasticsearch:")]
    if cfg is not None:
        errors += scaleout_errors(cfg)
    return (None if errors else cfg), errors


def scaleout_errors(cfg: RelayConfig) -> list[str]:
    """What the ``scaleout`` block's options say about each other, by key path."""
    so = cfg.scaleout
    errors = []
    if so.role == "top":
        if not so.syndic_relays:
            errors.append("scaleout.syndic_relays: required when scaleout.role is top")
        for i, sid in enumerate(so.syndic_relays or ()):
            if sid not in (cfg.trusted_syndics or ()):
                errors.append(
                    f"scaleout.syndic_relays[{i}]: {sid!r} is not in trusted_syndics (a syndic"
                    " relay owns the gateways its key sets vouch for)"
                )
    elif so.syndic_relays:
        errors.append(f"scaleout.syndic_relays: only for scaleout.role top, not {so.role}")
    if so.role == "syndic":
        if not so.syndic_id:
            errors.append("scaleout.syndic_id: required when scaleout.role is syndic")
    elif so.syndic_id:
        errors.append(f"scaleout.syndic_id: only for scaleout.role syndic, not {so.role}")
    return errors


def validate_relay(config: Any) -> tuple[bool, str]:
    """Validate the ``tributary_relay`` engine config; never raises."""
    return schema.verdict("tributary_relay", parse_relay, config)


def relay_config(
    config: Mapping[str, Any], cachedir: str, pki_dir: str | None = None
) -> RelayConfig:
    """The resolved settings of a valid engine config (raises ValueError naming the keys)."""
    cfg, errors = schema.parse(RelayConfig, config)
    if cfg is None:
        raise ValueError("tributary_relay: " + "; ".join(errors))
    return cfg.resolve(cachedir, pki_dir)


def engine_config(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tributary_relay`` engine block from master opts ({} if not configured)."""
    for entry in opts.get("engines") or []:
        if isinstance(entry, Mapping) and "tributary_relay" in entry:
            return dict(entry["tributary_relay"] or {})
    return {}
