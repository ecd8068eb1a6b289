"""What the rule tests share: a start time, parsed rules and readings as the relay hands them."""

from __future__ import annotations

from saltext.tributary.reaction.rules import parse_rules

T0 = 1_800_000_000_000
S = 1000


def rules(*items):
    """Parsed rules; the test fails on any validation error."""
    got, errors = parse_rules(list(items))
    assert not errors, errors
    return got


def reading(value, ts, gateway="gw-1", site="bne", sensor="boiler-1", metric="temperature"):
    """One reading as the rule engine takes it: (gateway, site, epoch, seq, fields)."""
    return (
        gateway,
        site,
        "ep",
        0,
        {"sensor": sensor, "metric": metric, "ts_ms": ts, "value": value},
    )
