"""Elasticsearch side: client construction, index templates, document shapes.

The client is elasticsearch-py 8.x: its requests carry ``compatible-with=8``, which 8.x and 9.x
clusters both accept (the 9.x client sends ``compatible-with=9``, which 8.x refuses).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saltext.tributary.relay.config import ElasticsearchConfig, es_config, parse_elasticsearch
from saltext.tributary.util import clock


def validate_es_config(cfg: Any) -> list[str]:
    """Every problem of an ``elasticsearch`` block, each naming its key path (its schema:
    :class:`~saltext.tributary.relay.config.ElasticsearchConfig`)."""
    return parse_elasticsearch(cfg)[1]


def make_client(cfg: ElasticsearchConfig | Mapping[str, Any]) -> Any:
    """An ``elasticsearch.Elasticsearch`` client from the config block (its defaults are
    :class:`~saltext.tributary.relay.config.ElasticsearchConfig`'s; raises ValueError naming
    the keys of a bad block)."""
    from elasticsearch import Elasticsearch

    es = es_config(cfg)
    kw: dict[str, Any] = {
        "request_timeout": es.request_timeout,
        "retry_on_timeout": False,
        "max_retries": 0,
    }
    if es.username:
        kw["basic_auth"] = (es.username, es.password or "")
    if es.api_key:
        kw["api_key"] = tuple(es.api_key) if isinstance(es.api_key, list) else es.api_key
    if es.ca_certs:
        kw["ca_certs"] = es.ca_certs
    if es.verify_certs is not None:
        kw["verify_certs"] = es.verify_certs
    return Elasticsearch(es.hosts, **kw)


def index_name(prefix: str, kind: str, ts_ms: int, daily: bool = True) -> str:
    """``<prefix>-<kind>-YYYY.MM.DD`` (UTC) for daily indices, else ``<prefix>-<kind>``."""
    if not daily:
        return f"{prefix}-{kind}"
    return f"{prefix}-{kind}-{time.strftime('%Y.%m.%d', time.gmtime(ts_ms / 1000))}"


_DATE = {"type": "date", "format": "epoch_millis||strict_date_optional_time"}
#: kept in ``_source``, not indexed (its inner types cannot conflict across gateways)
_OPAQUE = {"type": "object", "enabled": False}


def _props(special: dict[str, Any] | None = None, **by_type: str) -> dict[str, Any]:
    """Field mappings: ``by_type`` names the fields of each Elasticsearch type (space-separated;
    ``date`` fields take epoch milliseconds or ISO 8601), ``special`` maps the others whole."""
    props: dict[str, Any] = {
        name: _DATE if kind == "date" else {"type": kind}
        for kind, names in by_type.items()
        for name in names.split()
    }
    props.update(special or {})
    return props


@dataclass(frozen=True)
class Kind:
    """One kind of document: the fields its index template maps and how it is written."""

    properties: dict[str, Any]
    #: only the mapped fields are indexed (the others stay in ``_source``)
    strict: bool = False
    #: written as a data stream when ``indices: data_stream`` (append-only, time-stamped)
    data_stream: bool = True


#: Every kind of document the relay and the analysis write, in one table.
KINDS: dict[str, Kind] = {
    "readings": Kind(
        _props(
            {
                "agg": {
                    "properties": _props(double="window_s min max", long="count", date="first last")
                },
                # lag per hop in ms (relay/documents.hops)
                "hop_ms": {"properties": _props(long="gateway uplink relay")},
            },
            date="@timestamp relayed_at",
            keyword="gateway site sensor metric unit epoch",
            double="value",
            long="seq",
            geo_point="location",
        )
    ),
    "health": Kind(
        _props(
            {"grains": _OPAQUE},  # grain paths chosen per fleet
            date="@timestamp",
            keyword="gateway site epoch",
            long="last_seq",
            geo_point="location",
        )
    ),
    "deadletter": Kind(
        _props(
            {"original": _OPAQUE},
            date="@timestamp",
            keyword="gateway reason stage doc_id",
            text="detail",
        ),
        strict=True,
        data_stream=False,
    ),
    "metrics": Kind(
        _props(
            {"counters": {"type": "object", "dynamic": True}}, date="@timestamp", keyword="relay"
        )
    ),
    "anomalies": Kind(
        _props(
            date="@timestamp detected_at",
            keyword="gateway site sensor metric context state",
            double="value score expected band deviation",
            long="context_samples samples readings",
            boolean="anomaly",
            geo_point="location",
        )
    ),
    "findings": Kind(
        _props(
            {"detail": _OPAQUE},
            date="@timestamp raised_at",
            keyword="kind layer state site gateway sensor metric",
            double="duration_s",
        )
    ),
    "alerts": Kind(
        _props(
            date="@timestamp since",
            keyword="rule state kind severity site gateway sensor metric",
            double="value duration_s",
            boolean="renotify silenced",
        )
    ),
    # the audit of commands sent to devices (gateway records, relay/documents.command_doc)
    "commands": Kind(
        _props(
            {
                "payload": {"type": "keyword", "ignore_above": 4096},
                "reason": {"type": "keyword", "ignore_above": 2048},
                "answer": _OPAQUE,
            },
            date="@timestamp relayed_at",
            keyword="gateway site device command correlation_id outcome rule user jid topic epoch",
            double="payload_value latency_ms",
            integer="qos",
            long="seq",
        ),
        strict=True,
        data_stream=False,
    ),
}


def install_templates(
    client: Any,
    prefix: str,
    *,
    replicas: int = 1,
    shards: int = 1,
    data_streams: bool = False,
    refresh_interval: str | None = None,
) -> None:
    """Component template for shared settings plus one index template per kind.

    ``refresh_interval`` None leaves Elasticsearch's own: a refresh a second, skipped on a shard
    no search has reached for ``index.search.idle.after`` (30 s) until the next search, which
    waits for it (so searches see what they would with 1s). Setting the interval at all, even
    to 1s, turns that skipping off: with nobody searching, Elasticsearch spent about a quarter
    less CPU per reading without it (BENCHMARKS.md, "Evening of 2026-12-02").

    With ``data_streams`` the templates of the kinds marked ``data_stream`` declare a data
    stream named ``<prefix>-<kind>`` (documents are still bulk ``create``d with their id). This
    needs the data-streams module of a full Elasticsearch distribution; the integ-test zip used
    by the test suite lacks it, so that mode is untested here.
    """
    settings: dict[str, Any] = {"number_of_shards": shards, "number_of_replicas": replicas}
    if refresh_interval is not None:
        settings["refresh_interval"] = refresh_interval
    client.cluster.put_component_template(
        name=f"{prefix}-settings", template={"settings": settings}
    )
    for kind, spec in KINDS.items():
        client.cluster.put_component_template(
            name=f"{prefix}-{kind}-mappings",
            template={
                "mappings": {
                    "dynamic": "false" if spec.strict else True,
                    "properties": spec.properties,
                }
            },
        )
        extra: dict[str, Any] = {}
        if data_streams and spec.data_stream:
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
    now_ms = clock.now_ms() if now_ms is None else now_ms
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
