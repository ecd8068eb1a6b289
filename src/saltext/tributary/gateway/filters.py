"""Per-sensor filters applied on the gateway before a reading is spooled.

Configured per sensor key (``<sensor>/<metric>``, ``fnmatch`` patterns allowed) in a beacon's
``filters`` list::

    filters:
      - match: "boiler*/temperature"   # fnmatch on "<sensor>/<metric>"
        deadband: 0.2                  # emit only when |value - last emitted| > 0.2
        min_interval_s: 5              # never more than one reading per 5 s
        max_interval_s: 300            # but a steady value is still reported every 300 s
        min: -40                       # plausibility limits: outside [min, max] is set aside
        max: 125

Decisions, in order: plausibility (out of range -> ``implausible``, counted and set aside with
the reason), then minimum interval (-> ``filtered:min_interval``), then deadband
(-> ``filtered:deadband``) unless the maximum interval has passed since the last emitted
reading of that sensor. The first rule whose pattern matches a key applies.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saltext.tributary.protocol.reading import Reading
from saltext.tributary.util.schema import mappings, number_error

KEYS = ("match", "deadband", "min_interval_s", "max_interval_s", "min", "max")


class FilterConfigError(ValueError):
    """A bad filter rule; the message names the key."""


@dataclass(frozen=True)
class FilterRule:
    match: str
    deadband: float | None = None
    min_interval_s: float | None = None
    max_interval_s: float | None = None
    lo: float | None = None
    hi: float | None = None


def _num(rule: Mapping[str, Any], key: str, where: str) -> float | None:
    val = rule.get(key)
    if val is None:
        return None
    lo = 0 if key in ("deadband", "min_interval_s", "max_interval_s") else None
    err = number_error(val, f"{where}.{key}", lo=lo)
    if err:
        raise FilterConfigError(err)
    return float(val)


def compile_filters(raw: Any, where: str = "filters") -> list[FilterRule]:
    """Compile a ``filters`` list; raises FilterConfigError naming the bad key."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise FilterConfigError(f"{where}: must be a list of filter rules")
    out = []
    for w, rule in mappings(raw, where, KEYS, FilterConfigError):
        match = rule.get("match", "*")
        if not isinstance(match, str) or not match:
            raise FilterConfigError(f"{w}.match: must be a non-empty string pattern")
        fr = FilterRule(
            match=match,
            deadband=_num(rule, "deadband", w),
            min_interval_s=_num(rule, "min_interval_s", w),
            max_interval_s=_num(rule, "max_interval_s", w),
            lo=_num(rule, "min", w),
            hi=_num(rule, "max", w),
        )
        if fr.lo is not None and fr.hi is not None and fr.lo > fr.hi:
            raise FilterConfigError(f"{w}.min: {fr.lo} is above max {fr.hi}")
        if (
            fr.min_interval_s is not None
            and fr.max_interval_s is not None
            and fr.min_interval_s > fr.max_interval_s
        ):
            raise FilterConfigError(f"{w}.min_interval_s: above max_interval_s")
        out.append(fr)
    return out


class Filters:
    """Stateful filter chain: remembers the last emitted value and time of each sensor."""

    def __init__(self, rules: list[FilterRule]) -> None:
        self.rules = rules
        self._rule_of: dict[str, FilterRule | None] = {}
        self._last: dict[str, tuple[int, float]] = {}

    def rule_for(self, key: str) -> FilterRule | None:
        if key not in self._rule_of:
            self._rule_of[key] = next(
                (r for r in self.rules if fnmatch.fnmatchcase(key, r.match)), None
            )
        return self._rule_of[key]

    def check(self, r: Reading) -> str | None:
        """None if the reading passes, else the reason (``implausible:<detail>`` or filtered)."""
        rule = self.rule_for(r.key) if self.rules else None
        if rule is None:
            return None
        if rule.lo is not None and r.value < rule.lo:
            return f"implausible:below_min {r.value} < {rule.lo}"
        if rule.hi is not None and r.value > rule.hi:
            return f"implausible:above_max {r.value} > {rule.hi}"
        last = self._last.get(r.key)
        if last is not None:
            last_ts, last_val = last
            age_s = (r.ts_ms - last_ts) / 1000
            if rule.min_interval_s is not None and age_s < rule.min_interval_s:
                return "filtered:min_interval"
            due = rule.max_interval_s is not None and age_s >= rule.max_interval_s
            if rule.deadband is not None and not due and abs(r.value - last_val) <= rule.deadband:
                return "filtered:deadband"
        self._last[r.key] = (r.ts_ms, r.value)
        return None

    def apply(
        self, readings: list[Reading]
    ) -> tuple[list[Reading], dict[str, int], list[tuple[Reading, str]]]:
        """Split readings into (kept, counts by reason, implausible set aside with reason)."""
        if not self.rules:
            return readings, {}, []
        kept: list[Reading] = []
        counts: dict[str, int] = {}
        aside: list[tuple[Reading, str]] = []
        for r in readings:
            why = self.check(r)
            if why is None:
                kept.append(r)
                continue
            if why.startswith("implausible:"):
                counts["rejected:implausible"] = counts.get("rejected:implausible", 0) + 1
                aside.append((r, why))
            else:
                counts[why] = counts.get(why, 0) + 1
                counts["filtered"] = counts.get("filtered", 0) + 1
        return kept, counts, aside
