"""Elasticsearch side: client construction, index templates, document shapes.

The client is elasticsearch-py 8.x: its requests carry ``compatible-with=8``, which 8.x and 9.x
clusters both accept (the 9.x client sends ``compatible-with=9``, which 8.x refuses).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

KINDS = (
    "readings",
    "health",
    "deadletter",
    "metrics",
    "anomalies",
    "findings",
    "alerts",
    "commands",
)
#: Kinds whose mappings are strict about what is indexed (other fields stay in ``_source``).
UNDYNAMIC = ("deadletter", "commands")


def validate_es_config(cfg: Any) -> list[str]:
    if not isinstance(cfg, Mapping):
        return ["elasticsearch: must be a mapping (hosts, username/password or api_key, ca_certs)"]
    errors = []
    hosts = cfg.get("hosts")
    if isinstance(hosts, str):
        hosts = [hosts]
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        errors.append("elasticsearch.hosts: a URL or a list of URLs is required")
    elif not all(h.startswith(("http://", "https://")) for h in hosts):
        errors.append("elasticsearch.hosts: each URL must start with http:// or https://")
    if cfg.get("password") is not None and not cfg.get("username"):
        errors.append("elasticsearch.username: required with elasticsearch.password")
    if cfg.get("api_key") is not None and cfg.get("username"):
        errors.append("elasticsearch.api_key: use either api_key or username/password")
    for key in ("ca_certs", "api_key", "username", "password"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), (str, list)):
            errors.append(f"elasticsearch.{key}: must be a string")
    for key in ("replicas", "shards"):
        val = cfg.get(key)
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
            errors.append(f"elasticsearch.{key}: must be a non-negative integer")
    return errors


def make_client(cfg: Mapping[str, Any]) -> Any:
    """An ``elasticsearch.Elasticsearch`` client from the config block."""
    from elasticsearch import Elasticsearch

    hosts = cfg["hosts"]
    if isinstance(hosts, str):
        hosts = [hosts]
    kw: dict[str, Any] = {
        "request_timeout": float(cfg.get("request_timeout", 30)),
        "retry_on_timeout": False,
        "max_retries": 0,
    }
    if cfg.get("username"):
        kw["basic_auth"] = (cfg["username"], cfg.get("password") or "")
    if cfg.get("api_key"):
        kw["api_key"] = cfg["api_key"]
    if cfg.get("ca_certs"):
        kw["ca_certs"] = cfg["ca_certs"]
    if cfg.get("verify_certs") is not None:
        kw["verify_certs"] = bool(cfg["verify_certs"])
    return Elasticsearch(hosts, **kw)


def index_name(prefix: str, kind: str, ts_ms: int, daily: bool = True) -> str:
    """``<prefix>-<kind>-YYYY.MM.DD`` (UTC) for daily indices, else ``<prefix>-<kind>``."""
    if not daily:
        return f"{prefix}-{kind}"
    return f"{prefix}-{kind}-{time.strftime('%Y.%m.%d', time.gmtime(ts_ms / 1000))}"


_DATE = {"type": "date", "format": "epoch_millis||strict_date_optional_time"}
_KW = {"type": "keyword"}

MAPPINGS: dict[str, dict[str, Any]] = {
    "readings": {
        "@timestamp": _DATE,
        "gateway": _KW,
        "site": _KW,
        "sensor": _KW,
        "metric": _KW,
        "value": {"type": "double"},
        "unit": _KW,
        "seq": {"type": "long"},
        "epoch": _KW,
        "agg": {
            "properties": {
                "window_s": {"type": "double"},
                "min": {"type": "double"},
                "max": {"type": "double"},
                "count": {"type": "long"},
                "first": _DATE,
                "last": _DATE,
            }
        },
        "location": {"type": "geo_point"},
        "relayed_at": _DATE,
    },
    "health": {
        "@timestamp": _DATE,
        "gateway": _KW,
        "site": _KW,
        "last_seq": {"type": "long"},
        "epoch": _KW,
        "location": {"type": "geo_point"},
        # grain paths chosen per fleet: kept, not mapped (one gateway's types cannot conflict)
        "grains": {"type": "object", "enabled": False},
    },
    "deadletter": {
        "@timestamp": _DATE,
        "gateway": _KW,
        "reason": _KW,
        "detail": {"type": "text"},
        "stage": _KW,
        "doc_id": _KW,
        "original": {"type": "object", "enabled": False},
    },
    "metrics": {
        "@timestamp": _DATE,
        "relay": _KW,
        "counters": {"type": "object", "dynamic": True},
    },
    "anomalies": {
        "@timestamp": _DATE,
        "gateway": _KW,
        "site": _KW,
        "sensor": _KW,
        "metric": _KW,
        "value": {"type": "double"},
        "score": {"type": "double"},
        "anomaly": {"type": "boolean"},
        "expected": {"type": "double"},
        "band": {"type": "double"},
        "deviation": {"type": "double"},
        "context": _KW,
        "context_samples": {"type": "long"},
        "samples": {"type": "long"},
        "state": _KW,
        "detected_at": _DATE,
        "location": {"type": "geo_point"},
    },
    "findings": {
        "@timestamp": _DATE,
        "kind": _KW,
        "layer": _KW,
        "state": _KW,
        "site": _KW,
        "gateway": _KW,
        "sensor": _KW,
        "metric": _KW,
        "detail": {"type": "object", "enabled": False},
        "raised_at": _DATE,
        "duration_s": {"type": "double"},
    },
    "alerts": {
        "@timestamp": _DATE,
        "rule": _KW,
        "state": _KW,
        "kind": _KW,
        "severity": _KW,
        "site": _KW,
        "gateway": _KW,
        "sensor": _KW,
        "metric": _KW,
        "value": {"type": "double"},
        "since": _DATE,
        "duration_s": {"type": "double"},
        "renotify": {"type": "boolean"},
        "silenced": {"type": "boolean"},
    },
    # the audit of commands sent to devices (gateway records, relay/documents.command_doc)
    "commands": {
        "@timestamp": _DATE,
        "gateway": _KW,
        "site": _KW,
        "device": _KW,
        "command": _KW,
        "payload": {"type": "keyword", "ignore_above": 4096},
        "payload_value": {"type": "double"},
        "correlation_id": _KW,
        "outcome": _KW,
        "reason": {"type": "keyword", "ignore_above": 2048},
        "rule": _KW,
        "answer": {"type": "object", "enabled": False},
        "latency_ms": {"type": "double"},
        "user": _KW,
        "jid": _KW,
        "topic": _KW,
        "qos": {"type": "integer"},
        "epoch": _KW,
        "seq": {"type": "long"},
        "relayed_at": _DATE,
    },
}


#: Kinds written as data streams when ``indices: data_stream`` (append-only, time-stamped).
DATA_STREAM_KINDS = ("readings", "health", "metrics", "anomalies", "findings", "alerts")


def install_templates(
    client: Any, prefix: str, *, replicas: int = 1, shards: int = 1, data_streams: bool = False
) -> None:
    """Component template for shared settings plus one index template per kind.

    With ``data_streams`` the readings, health, metrics and anomalies templates declare a data
    stream named ``<prefix>-<kind>`` (documents are still bulk ``create``d with their id). This
    needs the data-streams module of a full Elasticsearch distribution; the integ-test zip used
    by the test suite lacks it, so that mode is untested here.
    """
    client.cluster.put_component_template(
        name=f"{prefix}-settings",
        template={
            "settings": {
                "number_of_shards": shards,
                "number_of_replicas": replicas,
                "refresh_interval": "1s",
            }
        },
    )
    for kind in KINDS:
        client.cluster.put_component_template(
            name=f"{prefix}-{kind}-mappings",
            template={
                "mappings": {
                    "dynamic": "false" if kind in UNDYNAMIC else True,
                    "properties": MAPPINGS[kind],
                }
            },
        )
        extra: dict[str, Any] = {}
        if data_streams and kind in DATA_STREAM_KINDS:
            extra["data_stream"] = {}
        client.indices.put_index_template(
            name=f"{prefix}-{kind}",
            index_patterns=[f"{prefix}-{kind}-*", f"{prefix}-{kind}"],
            composed_of=[f"{prefix}-settings", f"{prefix}-{kind}-mappings"],
            priority=200,
            meta={"managed_by": "tributary"},
            **extra,
        )


def precreate_indices(
    client: Any, prefix: str, daily: bool = True, now_ms: int | None = None
) -> list[str]:
    """Create today's and tomorrow's readings index ahead of the first bulk that needs it
    (index creation stalled the first bulk of the day by up to a second in ``make bench``).
    Indices that exist are left alone; returns the ones created."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    names = (
        [index_name(prefix, "readings", now_ms + d * 86_400_000, True) for d in (0, 1)]
        if daily
        else [index_name(prefix, "readings", now_ms, False)]
    )
    created = []
    for name in names:
        if client.indices.exists(index=name):
            continue
        try:
            client.indices.create(index=name)
            created.append(name)
        except Exception as exc:  # created meanwhile by a bulk or another relay: fine
            if "resource_already_exists" not in str(exc):
                raise
    return created
