"""Declarative alert rules: structured YAML in the relay engine's config, validated with key
paths, evaluated on confirmed readings, anomalies and health findings.

    rules:
      - name: boiler-hot
        match: {site: brisbane, sensor: 'boiler-*', metric: temperature}   # globs
        when: {above: 80, for_s: 60, clear_below: 75}   # hysteresis: fires above 80 held
        severity: critical                               # for 60 s, resolves below 75
        renotify_s: 3600
      - name: freezer-rising
        match: {sensor: 'freezer-*'}
        when: {rate_above: 0.05}                         # units per second
      - name: sensor-gone
        match: {gateway: 'gw-sydney-*'}
        when: {absent_s: 600}                            # no reading for 10 minutes
      - name: odd-for-the-hour
        when: {anomaly_score: 0.5}                       # the detector's score
      - name: site-down
        when: {finding: site_outage}                     # a health finding of this kind
      - name: boiler-room-hot
        match: {grains: {role: boiler-room, 'tributary:devices': 'boiler-*'}}
        when: {above: 90}
        flap: {changes: 4, window_s: 600, stable_s: 300}   # flap damping

Each rule has exactly one condition kind: a threshold (``above`` / ``below``, with optional
``clear_below`` / ``clear_above`` and ``for_s`` / ``clear_for_s``), ``rate_above`` /
``rate_below``, ``absent_s``, ``anomaly_score`` or ``finding``.

``match.grains`` maps a grain path (``:``-separated, as ``salt -G``) to a glob; a list grain
matches when one of its items does. The top master learns a gateway's grains from its signed
heartbeat, which carries only the paths its ``tributary_health`` beacon lists under ``grains``
(README, "Alerts"): a rule on a grain the heartbeat does not carry never matches.

``flap`` (optional): when an alert has changed state (fired or resolved) ``changes`` times in
``window_s``, it is held ``flapping`` (notified once) until its condition has not changed for
``stable_s``; it then fires or resolves once.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saltext.tributary.util import schema
from saltext.tributary.util.schema import option

NAME_RE = r"[a-z0-9][a-z0-9_-]{0,63}"
#: A grain path: ``role``, ``tributary:devices`` (``:`` separates levels, as ``salt -G``).
GRAIN_PATH_RE = r"[A-Za-z0-9_.-]{1,64}(:[A-Za-z0-9_.-]{1,64}){0,7}"
#: Grain paths one rule, or one heartbeat, may carry.
MAX_GRAINS = 16


@dataclass(frozen=True)
class Match:
    gateway: str = option("*", doc="glob on the gateway (minion) id")
    site: str = option("*", doc="glob on the site")
    sensor: str = option("*", doc="glob on the sensor")
    metric: str = option("*", doc="glob on the metric")
    grains: dict[str, str] = option({}, doc="grain path -> glob (from the signed heartbeat)")

    def matches(
        self,
        gateway: Any,
        site: Any,
        sensor: Any,
        metric: Any,
        grains: Mapping[str, Any] | None = None,
    ) -> bool:
        return all(
            pat == "*" or fnmatch.fnmatchcase(str(val), pat)
            for pat, val in (
                (self.gateway, gateway),
                (self.site, site),
                (self.sensor, sensor),
                (self.metric, metric),
            )
        ) and (not self.grains or grains_match(self.grains, grains or {}))


def grains_match(patterns: Mapping[str, str], grains: Mapping[str, Any]) -> bool:
    """Every pattern's grain is present and matches (a list: one of its items does)."""
    for path, pat in patterns.items():
        if path not in grains:
            return False
        val = grains[path]
        items = val if isinstance(val, list) else [val]
        if not any(fnmatch.fnmatchcase(str(v), pat) for v in items if not isinstance(v, dict)):
            return False
    return True


@dataclass(frozen=True)
class When:
    above: float | None = option(None, doc="fires when a value is above")
    below: float | None = option(None, doc="fires when a value is below")
    clear_below: float | None = option(None, doc="with above: resolves below this (hysteresis)")
    clear_above: float | None = option(None, doc="with below: resolves above this")
    for_s: float = option(0.0, range=(0, 86400 * 30), doc="the condition holds this long")
    clear_for_s: float = option(0.0, range=(0, 86400 * 30), doc="the clear condition holds")
    rate_above: float | None = option(None, doc="change per second above")
    rate_below: float | None = option(None, doc="change per second below")
    absent_s: float | None = option(None, range=(1, 86400 * 365), doc="no reading this long")
    anomaly_score: float | None = option(None, range=(0, 1), doc="detector score at least")
    finding: str | None = option(None, doc="a health finding of this kind is raised")

    def kind(self) -> str:
        kinds = [
            k
            for k, on in (
                ("threshold", self.above is not None or self.below is not None),
                ("rate", self.rate_above is not None or self.rate_below is not None),
                ("absent", self.absent_s is not None),
                ("anomaly", self.anomaly_score is not None),
                ("finding", self.finding is not None),
            )
            if on
        ]
        return kinds[0] if len(kinds) == 1 else ",".join(kinds) or "none"


@dataclass(frozen=True)
class Flap:
    changes: int = option(4, range=(2, 1000), doc="state changes in window_s that mean flapping")
    window_s: float = option(600.0, range=(1, 86400 * 7), doc="the window changes are counted in")
    stable_s: float = option(300.0, range=(1, 86400 * 7), doc="unchanged this long: settled")


@dataclass(frozen=True)
class Rule:
    name: str = option("", pattern=NAME_RE, pattern_doc="a-z, 0-9, '-', '_', at most 64")
    match: Match = option(Match)
    when: When = option(When)
    severity: str = option("warning", choices=("info", "warning", "critical"))
    renotify_s: float = option(0.0, range=(0, 86400 * 30), doc="repeat a firing alert; 0: never")
    flap: Flap | None = option(None, doc="flap damping (off unless given)")


def parse_rules(data: Any) -> tuple[list[Rule], list[str]]:
    """Rules, or every problem with its key path (``rules[1].when.above: ...``)."""
    if data is None:
        return [], []
    if not isinstance(data, list):
        return [], ["rules: must be a list of rules"]
    out: list[Rule] = []
    errors: list[str] = []
    names: set[str] = set()
    for i, item in enumerate(data):
        where = f"rules[{i}]"
        rule, errs = schema.parse(Rule, item, where)
        if rule is None:
            errors += errs
            continue
        w = rule.when
        kind = w.kind()
        if not rule.name:
            errors.append(f"{where}.name: required")
        elif rule.name in names:
            errors.append(f"{where}.name: {rule.name!r} is used twice")
        names.add(rule.name)
        if kind == "none":
            errors.append(
                f"{where}.when: needs one condition (above, below, rate_above,"
                " rate_below, absent_s, anomaly_score or finding)"
            )
        elif "," in kind:
            errors.append(f"{where}.when: one condition kind per rule, got {kind}")
        if w.above is not None and w.below is not None:
            errors.append(f"{where}.when: above and below are two rules")
        if w.clear_below is not None and (w.above is None or w.clear_below > w.above):
            errors.append(f"{where}.when.clear_below: needs above, and at most its value")
        if w.clear_above is not None and (w.below is None or w.clear_above < w.below):
            errors.append(f"{where}.when.clear_above: needs below, and at least its value")
        if w.finding is not None and not re.fullmatch(r"[a-z_]{1,40}", w.finding):
            errors.append(f"{where}.when.finding: a finding kind such as site_outage")
        errors += _grain_errors(rule.match.grains, f"{where}.match.grains")
        if rule.flap is not None and kind == "anomaly":
            errors.append(f"{where}.flap: not for anomaly rules (they resolve on a timer)")
        out.append(rule)
    return (out if not errors else []), errors


def _grain_errors(grains: Mapping[str, Any], where: str) -> list[str]:
    errors = []
    if len(grains) > MAX_GRAINS:
        errors.append(f"{where}: at most {MAX_GRAINS} grain paths")
    for path, pat in grains.items():
        if not isinstance(path, str) or not re.fullmatch(GRAIN_PATH_RE, path):
            errors.append(f"{where}.{path}: a grain path such as role or tributary:devices")
        elif not isinstance(pat, str) or not pat:
            errors.append(f"{where}.{path}: must be a non-empty string (a glob; quote numbers)")
    return errors


def uses_grains(rules: Sequence[Rule]) -> bool:
    return any(r.match.grains for r in rules)


def validate_rules(data: Any) -> tuple[bool, str]:
    return schema.verdict("tributary_relay rules", lambda d: parse_rules(d), data)


def fires(w: When, value: float) -> bool:
    """Does ``value`` meet a threshold rule's firing condition?"""
    return (w.above is not None and value > w.above) or (w.below is not None and value < w.below)


def clears(w: When, value: float) -> bool:
    """Does ``value`` meet a threshold rule's clearing condition (hysteresis)?"""
    if w.above is not None:
        return value < w.clear_below if w.clear_below is not None else value <= w.above
    if w.below is not None:
        return value > w.clear_above if w.clear_above is not None else value >= w.below
    return True


def rate_fires(w: When, rate: float) -> bool:
    return (w.rate_above is not None and rate > w.rate_above) or (
        w.rate_below is not None and rate < w.rate_below
    )


def as_mapping(rule: Rule) -> Mapping[str, Any]:
    return {"name": rule.name, "severity": rule.severity, "kind": rule.when.kind()}
