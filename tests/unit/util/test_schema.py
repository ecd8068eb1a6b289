"""Config schemas: every problem with its key path, unknown keys refused, defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass

from saltext.tributary.relay.config import RelayConfig, parse_relay
from saltext.tributary.util import schema
from saltext.tributary.util.schema import REQUIRED, option

ES = {"hosts": ["https://es:9200"]}


def test_defaults_and_yaml_names():
    cfg, errors = parse_relay({"elasticsearch": ES})
    assert errors == [] and cfg == RelayConfig(elasticsearch=ES)
    assert cfg.index_prefix == "tributary" and cfg.bulk.max_docs == 5_000 and cfg.daily
    assert schema.defaults(RelayConfig)["gaps"]["grace_s"] == 60.0


def test_every_problem_is_named_by_its_key_path():
    cfg, errors = parse_relay(
        {
            "elasticsearch": ES,
            "index_prefix": "Bad Prefix",
            "indices": "weekly",
            "allow_unsigned": "yes",
            "bulk": {"max_docs": 0, "extra": 1},
            "gaps": {"grace_s": -1, "per_minute": 2.5, "enabled": 1},
            "backoff": [],
            "surprise": True,
        }
    )
    assert cfg is None
    text = "; ".join(errors)
    for key in (
        "index_prefix: lowercase",
        "indices: must be one of",
        "allow_unsigned: must be true or false",
        "bulk.max_docs: must be an integer in 1..100000, got 0",
        "bulk.extra: unknown option",
        "gaps.grace_s: must be a number",
        "gaps.per_minute: must be an integer",
        "gaps.enabled: must be true or false",
        "backoff: must be a mapping",
        "surprise: unknown option",
    ):
        assert key in text, (key, errors)


def test_the_elasticsearch_block_refuses_unknown_keys_and_bad_values_by_path():
    bad = {**ES, "usr": "x", "replicas": -1, "request_timeout": 0, "verify_certs": "no"}
    bad["refresh_interval"] = "1 second"
    _, errors = parse_relay({"elasticsearch": bad})
    assert errors == [
        "elasticsearch.usr: unknown option",
        "elasticsearch.replicas: must be an integer in 0.., got -1",
        "elasticsearch.refresh_interval: must be a time like 1s, 500ms or 30s, or -1,"
        " got '1 second'",
        "elasticsearch.request_timeout: must be a positive number, got 0",
        "elasticsearch.verify_certs: must be true or false",
    ]
    every = {**ES, "username": "u", "password": "p", "ca_certs": "/ca.pem", "replicas": 0}
    every.update(shards=1, request_timeout=10, verify_certs=True, refresh_interval="5s")
    assert parse_relay({"elasticsearch": every})[1] == []


def test_numbers_convert_and_empty_blocks_take_the_defaults():
    cfg, errors = parse_relay({"elasticsearch": ES, "key_wait_s": 5, "gaps": None})
    assert errors == [] and cfg.key_wait_s == 5.0 and isinstance(cfg.key_wait_s, float)
    assert cfg.gaps == RelayConfig().gaps


def test_not_a_mapping():
    assert parse_relay(None) == (None, ["configuration must be a mapping"])
    assert schema.parse(RelayConfig, ["x"]) == (None, ["configuration: must be a mapping"])


def test_the_elasticsearch_defaults_live_in_the_relay_schema():
    from saltext.tributary.relay.config import ElasticsearchConfig, es_config
    from saltext.tributary.relay.elasticsearch import make_client

    es = parse_relay({"elasticsearch": {"hosts": "https://es:9200"}})[0].elasticsearch
    assert es == ElasticsearchConfig(hosts=["https://es:9200"]) == es_config(ES)
    assert (es.replicas, es.shards, es.request_timeout, es.probe_timeout) == (1, 1, 30.0, 10.0)
    assert schema.defaults(RelayConfig)["elasticsearch"]["replicas"] == 1
    # the client takes its timeout from the schema, or the block's own
    assert make_client(ES)._request_timeout == 30.0
    assert make_client({**ES, "request_timeout": 5})._request_timeout == 5.0
    for bad, why in (
        ({}, "elasticsearch.hosts: a URL or a list of URLs is required"),
        ({"hosts": ["es:9200"]}, "elasticsearch.hosts: each URL must start with http://"),
        ({**ES, "password": "p"}, "elasticsearch.username: required with elasticsearch.password"),
        ({**ES, "username": "u", "api_key": "k"}, "elasticsearch.api_key: use either api_key"),
    ):
        errors = parse_relay({"elasticsearch": bad})[1]
        assert len(errors) == 1 and errors[0].startswith(why), errors
        try:
            make_client(bad)
        except ValueError as exc:
            assert str(exc).startswith(why)
        else:
            raise AssertionError(f"make_client accepted {bad}")
    assert parse_relay({})[1] == [
        "elasticsearch: must be a mapping (hosts, username/password or api_key, ca_certs)"
    ]


@dataclass(frozen=True)
class Item:
    name: str = option(REQUIRED, nonempty=True)
    n: int = option(1, range=(0, 9))

    def problems(self, path):
        return [f"{path}.n: 7 is unlucky"] if self.n == 7 else []


@dataclass(frozen=True)
class Top:
    items: list[Item] = option(REQUIRED, items_doc="items")
    by_name: dict[str, str | Item] | None = option(None)


def test_blocks_in_lists_and_mappings_and_their_shorthands():
    top, errors = schema.parse(
        Top, {"items": [{"name": "a"}], "by_name": {"x": "b", "y": {"name": "c"}}}
    )
    assert errors == [] and top.items == [Item("a")] and top.by_name == {"x": "b", "y": Item("c")}
    _, errors = schema.parse(
        Top, {"items": [{"n": 10}, "x", {"name": "b", "n": 7}], "by_name": {"z": 5, "w": {"m": 1}}}
    )
    assert errors == [
        "items[0].name: required",
        "items[0].n: must be an integer in 0..9, got 10",
        "items[1]: must be a mapping",
        "items[2].n: 7 is unlucky",
        "by_name.z: must be a string or a mapping",
        "by_name.w.m: unknown option",
        "by_name.w.name: required",
    ]
    assert schema.parse(Top, {})[1] == ["items: required"]
    assert schema.parse(Top, {"items": []})[1] == ["items: must be a non-empty list of items"]
