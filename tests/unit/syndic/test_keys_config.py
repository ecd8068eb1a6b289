"""The ``tributary_keys`` engine's configuration: one schema for ``validate()`` and ``start()``."""

from __future__ import annotations

from saltext.tributary.syndic.keys import KeysConfig, parse_keys, validate


def test_defaults_and_yaml_names():
    assert parse_keys({}) == (KeysConfig(), [])
    cfg, errors = parse_keys({"interval": 5, "min_gap_s": 1, "syndic_id": "syn-1"})
    assert errors == [] and cfg == KeysConfig(interval=5.0, min_gap_s=1.0, syndic_id="syn-1")
    assert (KeysConfig().interval, KeysConfig().min_gap_s, KeysConfig().signing_key) == (
        60.0,
        2.0,
        None,
    )


def test_every_problem_is_named_by_its_key_path():
    ok, msg = validate({"interval": 0, "min_gap_s": "soon", "signing_key": 5, "intervall": 5})
    assert ok is False
    for part in (
        "interval: must be a number in",
        "min_gap_s: must be a number, got 'soon'",
        "signing_key: must be a string",
        "intervall: unknown option",
    ):
        assert part in msg, (part, msg)
    assert validate(None) == (False, "tributary_keys: configuration must be a mapping")
