"""Config schemas: every problem with its key path, unknown keys refused, defaults in one place."""

from __future__ import annotations

from saltext.tributary.relay.config import RelayConfig, parse_relay
from saltext.tributary.util import schema

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
    _, errors = parse_relay({"elasticsearch": bad})
    assert errors == [
        "elasticsearch.usr: unknown option",
        "elasticsearch.replicas: must be an integer in 0.., got -1",
        "elasticsearch.request_timeout: must be a positive number, got 0",
        "elasticsearch.verify_certs: must be true or false",
    ]
    every = {**ES, "username": "u", "password": "p", "ca_certs": "/ca.pem", "replicas": 0}
    every.update(shards=1, request_timeout=10, verify_certs=True)
    assert parse_relay({"elasticsearch": every})[1] == []


def test_numbers_convert_and_empty_blocks_take_the_defaults():
    cfg, errors = parse_relay({"elasticsearch": ES, "key_wait_s": 5, "gaps": None})
    assert errors == [] and cfg.key_wait_s == 5.0 and isinstance(cfg.key_wait_s, float)
    assert cfg.gaps == RelayConfig().gaps


def test_not_a_mapping():
    assert parse_relay(None) == (None, ["configuration must be a mapping"])
    assert schema.parse(RelayConfig, ["x"]) == (None, ["configuration: must be a mapping"])
