"""MQTT topics and payloads to readings.

A *topic rule* maps an MQTT topic pattern to sensors and metrics. Patterns use MQTT wildcards
(``+`` one level, ``#`` the rest) and named captures ``{name}`` (one level), usable in the
``sensor`` and ``metric`` templates::

    - topic: "site/{room}/{sensor}/temperature"
      sensor: "{room}-{sensor}"     # default: "{sensor}" if captured, else the topic's last level
      metric: temperature          # default: "{metric}" if captured, else "value"
      unit: C
      format: number               # number | json | senml | flat
      convert: F_to_C              # or {scale: 0.1, offset: 0}

Formats:
- ``number``: the payload is one number (``21.5``).
- ``json``: a JSON object; ``fields`` maps dotted paths to metrics
  (``{"env.temp": {"metric": "temperature", "unit": "C"}}`` or ``{"env.temp": temperature}``),
  ``timestamp`` names an optional time field and its format (``ms``, ``s`` or ``iso``).
- ``senml``: RFC 8428 SenML JSON (base name/time/unit/value, records; sensor and metric are
  the resolved name split at its last ``:`` or ``/``).
- ``flat``: a zigbee2mqtt-style flat object; every numeric top-level key is a metric
  (``fields`` may restrict and rename; non-numeric keys such as ``linkquality`` strings are
  ignored, not rejected).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from saltext.tributary.protocol.reading import (
    TS_MAX_MS,
    TS_MIN_MS,
    Reading,
    RejectedReading,
    check_name,
    check_ts,
    check_unit,
    make_reading,
)
from saltext.tributary.util import schema
from saltext.tributary.util.schema import REQUIRED, option

FORMATS = ("number", "json", "senml", "flat")
MAX_PAYLOAD = 65_536
#: Named unit conversions: (scale, offset, resulting unit): out = value * scale + offset.
CONVERSIONS: dict[str, tuple[float, float, str]] = {
    "F_to_C": (5 / 9, -32 * 5 / 9, "C"),
    "K_to_C": (1.0, -273.15, "C"),
    "C_to_F": (9 / 5, 32.0, "F"),
    "mC_to_C": (0.001, 0.0, "C"),
    "Pa_to_hPa": (0.01, 0.0, "hPa"),
    "mV_to_V": (0.001, 0.0, "V"),
    "mA_to_A": (0.001, 0.0, "A"),
}
_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class ConfigError(ValueError):
    """A bad topic rule; the message names the offending key."""


def _compile(pattern: str) -> tuple[re.Pattern[str], str]:
    """MQTT pattern with {captures} -> (regex, subscription filter)."""
    levels = pattern.split("/")
    rx = []
    sub = []
    for i, level in enumerate(levels):
        m = _CAPTURE.match(level)
        if m:
            rx.append(f"(?P<{m.group(1)}>[^/]+)")
            sub.append("+")
        elif level == "+":
            rx.append("[^/]+")
            sub.append("+")
        elif level == "#":
            if i != len(levels) - 1:
                raise ConfigError(f"topic {pattern!r}: '#' must be the last level")
            rx.append(".*") if i == 0 else rx.append("(?:.*)")
            sub.append("#")
        else:
            if "+" in level or "#" in level or "{" in level or "}" in level:
                raise ConfigError(f"topic {pattern!r}: bad level {level!r}")
            rx.append(re.escape(level))
            sub.append(level)
    regex = "/".join(rx)
    if levels[-1] == "#" and len(levels) > 1:
        # 'a/#' also matches 'a' itself (MQTT spec)
        regex = "/".join(rx[:-1]) + "(?:/.*)?"
    return re.compile(f"^{regex}$"), "/".join(sub)


@dataclass
class FieldSpec:
    path: list[str]
    metric: str
    unit: str | None
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True)
class Conversion:
    """A ``convert`` mapping: ``out = value * scale + offset``, then ``unit``."""

    scale: float = option(1.0)
    offset: float = option(0.0)
    unit: str | None = option(None, doc="the unit after conversion (default: the rule's)")


@dataclass(frozen=True)
class FieldOptions:
    """One entry of a rule's ``fields`` map (or just the metric name)."""

    metric: str | None = option(None, doc="default: the path's last part")
    unit: str | None = option(None)
    convert: str | Conversion | None = option(None, choices=tuple(CONVERSIONS))


@dataclass(frozen=True)
class TimestampOptions:
    """A rule's ``timestamp`` (or just the field's dotted path)."""

    field: str = option(REQUIRED, nonempty=True, doc="dotted path of the time field")
    format: str = option("ms", choices=("ms", "s", "iso"))


@dataclass(frozen=True)
class TopicOptions:
    """One item of a ``tributary_mqtt`` beacon's ``topics`` list (see the module docstring)."""

    topic: str = option(REQUIRED, nonempty=True, doc="MQTT pattern with {captures}")
    sensor: str | None = option(None, doc='default: "{sensor}" if captured, else the last level')
    metric: str | None = option(None, doc='default: "{metric}" if captured, else "value"')
    unit: str | None = option(None)
    format: str = option("number", choices=FORMATS)
    convert: str | Conversion | None = option(None, choices=tuple(CONVERSIONS))
    fields: dict[str, str | FieldOptions] | None = option(None, doc="dotted path -> metric")
    timestamp: str | TimestampOptions | None = option(None)

    def field_options(self) -> dict[str, FieldOptions]:
        """``fields`` with the metric-name shorthand spelled out."""
        return {
            path: FieldOptions(metric=spec) if isinstance(spec, str) else spec
            for path, spec in (self.fields or {}).items()
        }

    def problems(self, path: str) -> list[str]:
        """What the rule's options say about each other, by key path."""
        errors = []
        try:
            _compile(self.topic)
        except ConfigError as exc:
            errors.append(f"{path}.topic: {exc}")
        for name, spec in self.field_options().items():
            try:
                check_name("metric", spec.metric or name.rsplit(".", 1)[-1])
            except RejectedReading as exc:
                errors.append(f"{path}.fields.{name}.metric: {exc.detail}")
        if self.format == "json" and not self.fields:
            errors.append(f"{path}.fields: format json needs a field map")
        return errors


#: The ``topics`` list's own checks (the items' are :class:`TopicOptions`'s).
TOPICS_CHECKS: dict[str, Any] = {"items_doc": "topic rules"}


def _conversion(value: str | Conversion | None) -> tuple[float, float, str | None]:
    if value is None:
        return 1.0, 0.0, None
    if isinstance(value, str):
        return CONVERSIONS[value]
    return value.scale, value.offset, value.unit


@dataclass
class TopicRule:
    """One compiled topic rule."""

    topic: str
    regex: re.Pattern[str]
    subscription: str
    fmt: str
    sensor: str | None
    metric: str | None
    unit: str | None
    scale: float
    offset: float
    fields: list[FieldSpec] = field(default_factory=list)
    ts_field: list[str] | None = None
    ts_format: str = "ms"

    @classmethod
    def from_options(cls, opts: TopicOptions) -> TopicRule:
        """The rule a parsed :class:`TopicOptions` describes."""
        regex, sub = _compile(opts.topic)
        scale, offset, conv_unit = _conversion(opts.convert)
        fields = []
        for path, spec in opts.field_options().items():
            fs, fo, fu = _conversion(spec.convert)
            fields.append(
                FieldSpec(
                    path=path.split("."),
                    metric=spec.metric or path.rsplit(".", 1)[-1],
                    unit=fu or spec.unit,
                    scale=fs,
                    offset=fo,
                )
            )
        ts = opts.timestamp
        if isinstance(ts, str):
            ts = TimestampOptions(field=ts)
        return cls(
            topic=opts.topic,
            regex=regex,
            subscription=sub,
            fmt=opts.format,
            sensor=opts.sensor,
            metric=opts.metric,
            unit=conv_unit or opts.unit,
            scale=scale,
            offset=offset,
            fields=fields,
            ts_field=ts.field.split(".") if ts else None,
            ts_format=ts.format if ts else "ms",
        )

    @classmethod
    def from_config(cls, cfg: Any, where: str = "topics") -> TopicRule:
        """One rule from its mapping; raises ConfigError naming every bad key."""
        opts, errors = schema.parse(TopicOptions, cfg, where)
        if opts is None:
            raise ConfigError("; ".join(errors))
        return cls.from_options(opts)


def compile_rules(raw: Any) -> list[TopicRule]:
    """The ``topics`` list of a beacon config on its own; raises ConfigError naming every bad
    key (``topics[0].format: ...``)."""
    rules, errors = schema.parse_items(TopicOptions, raw, "topics", **TOPICS_CHECKS)
    if rules is None:
        raise ConfigError("; ".join(errors))
    return [TopicRule.from_options(r) for r in rules]


def _get(obj: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _ts(value: Any, fmt: str) -> int:
    try:
        if fmt == "iso":
            if not isinstance(value, str):
                raise ValueError
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError
        return round(value * 1000) if fmt == "s" else int(value)
    except (ValueError, OverflowError):
        raise RejectedReading("bad_timestamp", f"timestamp {value!r} is not {fmt}")


def _fill(template: str | None, caps: Mapping[str, str], default: str) -> str:
    if template is None:
        return default
    try:
        return template.format_map(caps)
    except (KeyError, IndexError, ValueError):
        raise RejectedReading("bad_topic", f"template {template!r} needs captures {dict(caps)}")


def _loads(payload: bytes) -> Any:
    try:
        if payload[:1] in _OBJECT_START and b"\0" not in payload:
            # plain UTF-8 (what MQTT devices send): one decoder for every message, where
            # json.loads builds one per call with these options and sniffs the encoding
            return _JSON.decode(payload.decode("utf-8"))
        return json.loads(payload, parse_constant=_reject_constant)  # UTF-16/32, BOMs
    except RejectedReading:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise RejectedReading("bad_json", str(exc)[:120])


def _reject_constant(name: str) -> Any:
    raise RejectedReading("not_finite", f"JSON constant {name}")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_OBJECT_START = (b"{", b"[")


class Mapper:
    """Turns (topic, payload) into readings with the first matching rule."""

    #: Topics remembered with their rule, sensor and metric (a site has a bounded set of
    #: topics; the cache is emptied if a flood of distinct ones fills it).
    TOPIC_CACHE = 4096

    def __init__(self, rules: list[TopicRule]) -> None:
        self.rules = rules
        self._topics: dict[str, tuple[TopicRule, str, str] | None] = {}
        #: number-format topics whose sensor, metric and unit passed their checks once, with
        #: the unit as a reading carries it, and no scale or offset: their readings are built
        #: without checking those again (the value and time are still checked)
        self._plain: dict[str, str | None] = {}

    @property
    def subscriptions(self) -> list[str]:
        return sorted({r.subscription for r in self.rules})

    def match(self, topic: str) -> tuple[TopicRule, dict[str, str]] | None:
        for rule in self.rules:
            m = rule.regex.match(topic)
            if m:
                return rule, m.groupdict()
        return None

    def _route(self, topic: str) -> tuple[TopicRule, str, str] | None:
        """The rule, sensor and metric of ``topic`` (None: no rule matches); remembered. A
        template that cannot be filled raises RejectedReading and is not remembered."""
        found = self.match(topic)
        known: tuple[TopicRule, str, str] | None = None
        if found is not None:
            rule, caps = found
            sensor = _fill(rule.sensor, caps, caps.get("sensor") or topic.rsplit("/", 1)[-1])
            metric = _fill(rule.metric, caps, caps.get("metric") or "value")
            known = (rule, sensor, metric)
        if len(self._topics) >= self.TOPIC_CACHE:
            self._topics.clear()
            self._plain.clear()
        self._topics[topic] = known
        if known is not None and known[0].fmt == "number":
            rule, sensor, metric = known
            try:
                check_name("sensor", sensor)
                check_name("metric", metric)
                unit = check_unit(rule.unit)
            except RejectedReading:
                pass  # the checked path says why, message by message
            else:
                if rule.scale == 1.0 and rule.offset == 0.0:
                    self._plain[topic] = unit
        return known

    def parse(
        self, topic: str, payload: bytes, now_ms: int, rejects: list[RejectedReading] | None = None
    ) -> list[Reading]:
        """Readings in one message; raises RejectedReading (with a reason) for a bad message.

        Where a message carries several readings (a JSON field map, a flat object), a bad
        field is appended to ``rejects`` and the good fields are still returned.
        """
        if rejects is None:
            rejects = []
        if len(payload) > MAX_PAYLOAD:
            raise RejectedReading("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD}")
        try:
            known = self._topics[topic]
        except KeyError:
            known = self._route(topic)
        if known is None:
            raise RejectedReading("unknown_topic", topic)
        rule, sensor, metric = known
        if rule.fmt == "number":
            try:
                text = payload.decode("ascii").strip()
                value = float(text)
            except (UnicodeDecodeError, ValueError):
                raise RejectedReading("not_numeric", repr(payload[:40]))
            plain = self._plain
            if (
                topic in plain
                and math.isfinite(value)
                and type(now_ms) is int
                and TS_MIN_MS <= now_ms < TS_MAX_MS
            ):
                # what make_reading would build, its name and unit checks done once per topic
                return [Reading(sensor, metric, value, now_ms, plain[topic])]
            return [
                self._reading(sensor, metric, value, now_ms, rule.unit, rule.scale, rule.offset)
            ]
        doc = _loads(payload)
        if rule.fmt == "senml":
            return self._senml(doc, sensor, rule, now_ms)
        if not isinstance(doc, Mapping):
            raise RejectedReading("not_object", f"JSON {type(doc).__name__}, expected an object")
        ts = now_ms
        if rule.ts_field:
            raw_ts = _get(doc, rule.ts_field)
            if raw_ts is not None:
                ts = check_ts(_ts(raw_ts, rule.ts_format))
        out: list[Reading] = []
        if rule.fmt == "json" or (rule.fmt == "flat" and rule.fields):
            for f in rule.fields:
                val = _get(doc, f.path)
                try:
                    if val is None:
                        if rule.fmt == "flat":
                            continue
                        raise RejectedReading("missing_field", ".".join(f.path))
                    out.append(
                        self._reading(
                            sensor, f.metric, val, ts, f.unit or rule.unit, f.scale, f.offset
                        )
                    )
                except RejectedReading as exc:
                    # One bad field is one bad reading: set it aside, keep the others.
                    rejects.append(exc)
        else:  # flat, every numeric top-level key
            skip = rule.ts_field[0] if rule.ts_field else None
            for key, val in doc.items():
                if key == skip or isinstance(val, bool) or not isinstance(val, (int, float)):
                    continue
                try:
                    out.append(self._reading(sensor, key, val, ts, None, 1.0, 0.0))
                except RejectedReading as exc:
                    rejects.append(exc)
        if not out and not rejects:
            raise RejectedReading("no_values", "message carried no numeric field")
        return out

    @staticmethod
    def _reading(
        sensor: str, metric: str, value: Any, ts: int, unit: str | None, scale: float, offset: float
    ) -> Reading:
        r = make_reading(sensor, metric, value, ts, unit)
        if scale != 1.0 or offset != 0.0:
            r = make_reading(sensor, metric, r.value * scale + offset, ts, unit)
        return r

    def _senml(self, doc: Any, sensor: str, rule: TopicRule, now_ms: int) -> list[Reading]:
        if isinstance(doc, Mapping):
            doc = [doc]
        if not isinstance(doc, list) or not doc:
            raise RejectedReading("bad_senml", "SenML pack must be a non-empty array")
        out: list[Reading] = []
        bn, bt, bu, bv = "", 0.0, None, 0.0
        for rec in doc:
            if not isinstance(rec, Mapping):
                raise RejectedReading("bad_senml", "record is not an object")
            bn = rec.get("bn", bn)
            bt = rec.get("bt", bt)
            bu = rec.get("bu", bu)
            bv = rec.get("bv", bv)
            if not isinstance(bn, str) or isinstance(bt, bool) or not isinstance(bt, (int, float)):
                raise RejectedReading("bad_senml", "bn must be a string and bt a number")
            if "v" not in rec:
                if any(k in rec for k in ("vs", "vb", "vd")):
                    raise RejectedReading("not_numeric", "SenML record has vs/vb/vd, not v")
                continue  # base-only record
            name = bn + str(rec.get("n", ""))
            t = rec.get("t", 0)
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise RejectedReading("bad_timestamp", f"SenML t {t!r}")
            when = bt + t
            if not math.isfinite(when) or abs(when) > 2**42:
                raise RejectedReading("bad_timestamp", f"SenML time {when!r}")
            # RFC 8428 section 4.5.3: values below 2**28 are relative to now.
            ts = now_ms + round(when * 1000) if when < 2**28 else round(when * 1000)
            v = rec["v"]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RejectedReading("not_numeric", f"SenML v {v!r}")
            if isinstance(bv, (int, float)) and not isinstance(bv, bool):
                v = v + bv
            sep = max(name.rfind(":"), name.rfind("/"))
            if sep > 0:
                s_name, metric = name[:sep], name[sep + 1 :]
            else:
                s_name, metric = sensor, name or (rule.metric or "value")
            unit = rec.get("u", bu)
            out.append(
                self._reading(s_name, metric, v, ts, unit or rule.unit, rule.scale, rule.offset)
            )
        if not out:
            raise RejectedReading("no_values", "SenML pack carried no numeric record")
        return out
