"""The per-rule action table and the reactions an alert event turns into.

Master config (``/etc/salt/master.d/tributary-reactor.conf``, written by ``tributary.master``)::

    tributary_reactor:
      renotify: false                 # act on re-notifications of a firing alert too
      notify:                         # where `notify` actions publish (upstream broker)
        broker: {host: mqtt.example.internal, port: 8883, username: ops, password_file: ...,
                 tls_ca: /etc/tributary/upstream-ca.pem}
        topic: 'tributary/alerts/{site}/{rule}/{state}'
        qos: 1
      actions:
        boiler-hot:                   # a rule name
          firing:                     # an alert state: firing | resolved
            - command: {device: '{sensor}', devices: ['boiler-*'], command: setpoint,
                        payload: 60}
            - state: {tgt: gateway, mods: [tributary.gateway]}
            - notify: {}
          resolved:
            - notify: {topic: 'ops/{site}/resolved'}

Templates may name ``{rule}``, ``{state}``, ``{gateway}``, ``{site}``, ``{sensor}``,
``{metric}`` and ``{severity}``; each value must be a plain name (letters, digits, ``_.:@-``),
so an expanded device or topic never holds ``/``, ``+``, ``#``, globs or spaces.

Event data is untrusted (a gateway chose its sensor names): only the action table chooses
functions, commands, payloads, state targets and topics. ``tgt: gateway`` means the alert's
own gateway, checked to be a minion id and targeted as a one-item list (never a glob). A
device taken from the event (``{sensor}``) must match the action's ``devices`` globs. An
event that a minion fired (its data carries ``cmd``/``id``, as Salt adds to every minion
event) or whose data disagrees with its tag makes no reactions.
"""

from __future__ import annotations

import fnmatch
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.gateway.sources.mqtt import BrokerConfig, parse_broker
from saltext.tributary.util.schema import number_error

CONFIG_KEY = "tributary_reactor"
STATES = ("firing", "resolved")
FIELDS = ("rule", "state", "gateway", "site", "sensor", "metric", "severity")
NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
MINION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SLS_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
TGT_TYPES = ("glob", "list", "grain", "pcre", "compound", "nodegroup", "ipcidr", "pillar")
DEFAULT_TOPIC = "tributary/alerts/{site}/{rule}/{state}"
#: Alert fields a notification carries (the relay's alert document, nothing else).
MESSAGE_FIELDS = (
    "rule",
    "state",
    "kind",
    "severity",
    "gateway",
    "site",
    "sensor",
    "metric",
    "value",
    "since",
    "duration_s",
    "renotify",
    "@timestamp",
)


@dataclass(frozen=True)
class CommandAction:
    device: str
    command: str
    payload: Any = None
    devices: tuple[str, ...] = ()
    timeout_s: float | None = None


@dataclass(frozen=True)
class StateAction:
    mods: tuple[str, ...]
    tgt: str = "gateway"
    tgt_type: str = "glob"
    test: bool = False


@dataclass(frozen=True)
class NotifyAction:
    topic: str | None = None


Action = CommandAction | StateAction | NotifyAction


@dataclass(frozen=True)
class NotifyConfig:
    broker: BrokerConfig
    topic: str = DEFAULT_TOPIC
    qos: int = 1
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ReactorConfig:
    actions: dict[str, dict[str, tuple[Action, ...]]] = field(default_factory=dict)
    notify: NotifyConfig | None = None
    renotify: bool = False


def _fields_of(template: str) -> list[str] | None:
    """The placeholders of ``template``, or None when it is not a plain ``{name}`` template."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return None
    names = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if spec or conv or not name:
            return None
        names.append(name)
    return names


def _template_error(value: Any, path: str, *, topic: bool) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{path}: must be a non-empty string"
    names = _fields_of(value)
    if names is None:
        return f"{path}: {value!r} is not a template of plain {{name}} fields"
    bad = [n for n in names if n not in FIELDS]
    if bad:
        return f"{path}: unknown field {{{bad[0]}}} (one of {', '.join(FIELDS)})"
    literal = string.Formatter().vformat(value, (), {n: "x" for n in FIELDS})
    if topic:
        if "+" in literal or "#" in literal or literal.startswith("/") or "//" in literal:
            return f"{path}: {value!r} must be a topic without wildcards or empty levels"
    elif not NAME_RE.fullmatch(literal):
        return f"{path}: {value!r} is not a name"
    return None


def _only(data: Mapping[str, Any], path: str, known: tuple[str, ...]) -> list[str]:
    return [f"{path}.{k}: unknown option" for k in data if k not in known]


def _parse_action(item: Any, path: str) -> tuple[Action | None, list[str]]:
    if not isinstance(item, Mapping) or len(item) != 1:
        return None, [f"{path}: must be one of {{command: ...}}, {{state: ...}}, {{notify: ...}}"]
    ((kind, opts),) = item.items()
    opts = {} if opts is None and kind == "notify" else opts
    p = f"{path}.{kind}"
    if kind not in ("command", "state", "notify"):
        return None, [f"{path}: unknown action {kind!r} (command, state or notify)"]
    if not isinstance(opts, Mapping):
        return None, [f"{p}: must be a mapping"]
    if kind == "command":
        errors = _only(opts, p, ("device", "command", "payload", "devices", "timeout_s"))
        for key in ("device", "command"):
            if key not in opts:
                errors.append(f"{p}.{key}: required")
        device, command = opts.get("device"), opts.get("command")
        if "device" in opts:
            err = _template_error(device, f"{p}.device", topic=False)
            errors += [err] if err else []
        if "command" in opts and (not isinstance(command, str) or not NAME_RE.fullmatch(command)):
            errors.append(f"{p}.command: {command!r} is not a name")
        devices = opts.get("devices", [])
        if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
            errors.append(f"{p}.devices: must be a list of globs")
            devices = []
        if isinstance(device, str) and "{" in device and not devices:
            errors.append(f"{p}.devices: required when the device comes from the event")
        timeout = opts.get("timeout_s")
        err = None if timeout is None else number_error(timeout, f"{p}.timeout_s", positive=True)
        errors += [err] if err else []
        try:
            json.dumps(opts.get("payload"))
        except (TypeError, ValueError):
            errors.append(f"{p}.payload: must be JSON data")
        if errors:
            return None, errors
        return (
            CommandAction(
                device=str(device),
                command=str(command),
                payload=opts.get("payload"),
                devices=tuple(devices),
                timeout_s=None if timeout is None else float(timeout),
            ),
            [],
        )
    if kind == "state":
        errors = _only(opts, p, ("mods", "tgt", "tgt_type", "test"))
        mods = opts.get("mods")
        if isinstance(mods, str):
            mods = [mods]
        if not isinstance(mods, list) or not mods:
            errors.append(f"{p}.mods: required, a list of SLS names")
            mods = []
        for i, m in enumerate(mods):
            if not isinstance(m, str) or not SLS_RE.fullmatch(m):
                errors.append(f"{p}.mods[{i}]: {m!r} is not an SLS name")
        tgt = opts.get("tgt", "gateway")
        if not isinstance(tgt, str) or not tgt or "{" in tgt:
            errors.append(f"{p}.tgt: must be 'gateway' or a fixed target (no templates)")
        tgt_type = opts.get("tgt_type", "glob")
        if tgt_type not in TGT_TYPES:
            errors.append(f"{p}.tgt_type: must be one of {', '.join(TGT_TYPES)}, got {tgt_type!r}")
        test = opts.get("test", False)
        if not isinstance(test, bool):
            errors.append(f"{p}.test: must be true or false")
        if errors:
            return None, errors
        return StateAction(mods=tuple(mods), tgt=tgt, tgt_type=tgt_type, test=test), []
    errors = _only(opts, p, ("topic",))
    if "topic" in opts:
        err = _template_error(opts["topic"], f"{p}.topic", topic=True)
        errors += [err] if err else []
    if errors:
        return None, errors
    return NotifyAction(topic=opts.get("topic")), []


def parse_config(data: Any, path: str = CONFIG_KEY) -> tuple[ReactorConfig | None, list[str]]:
    """The ``tributary_reactor`` config, or every problem with its key path."""
    if data is None:
        return ReactorConfig(), []
    if not isinstance(data, Mapping):
        return None, [f"{path}: must be a mapping"]
    errors = _only(data, path, ("actions", "notify", "renotify"))
    renotify = data.get("renotify", False)
    if not isinstance(renotify, bool):
        errors.append(f"{path}.renotify: must be true or false")
    notify = None
    raw_notify = data.get("notify")
    if raw_notify is not None:
        np = f"{path}.notify"
        if not isinstance(raw_notify, Mapping):
            errors.append(f"{np}: must be a mapping")
        else:
            errors += _only(raw_notify, np, ("broker", "topic", "qos", "timeout_s"))
            broker, berrs = parse_broker(raw_notify.get("broker") or {})
            errors += [f"{np}.{e}" for e in berrs]
            topic = raw_notify.get("topic", DEFAULT_TOPIC)
            err = _template_error(topic, f"{np}.topic", topic=True)
            errors += [err] if err else []
            qos = raw_notify.get("qos", 1)
            if qos not in (0, 1, 2) or isinstance(qos, bool):
                errors.append(f"{np}.qos: must be 0, 1 or 2, got {qos!r}")
            timeout = raw_notify.get("timeout_s", 10)
            err = number_error(timeout, f"{np}.timeout_s", positive=True)
            errors += [err] if err else []
            if broker is not None and not errors:
                notify = NotifyConfig(broker, topic, int(qos), float(timeout))
    actions: dict[str, dict[str, tuple[Action, ...]]] = {}
    raw = data.get("actions", {})
    if not isinstance(raw, Mapping):
        errors.append(f"{path}.actions: must be a mapping of rule names")
        raw = {}
    for rule, by_state in raw.items():
        rp = f"{path}.actions.{rule}"
        if not isinstance(rule, str) or not NAME_RE.fullmatch(rule):
            errors.append(f"{rp}: {rule!r} is not a rule name")
            continue
        if not isinstance(by_state, Mapping):
            errors.append(f"{rp}: must map firing/resolved to lists of actions")
            continue
        actions[rule] = {}
        for state, items in by_state.items():
            sp = f"{rp}.{state}"
            if state not in STATES:
                errors.append(f"{sp}: unknown alert state (firing or resolved)")
                continue
            if not isinstance(items, list) or not items:
                errors.append(f"{sp}: must be a non-empty list of actions")
                continue
            parsed = []
            for i, item in enumerate(items):
                action, errs = _parse_action(item, f"{sp}[{i}]")
                errors += errs
                if action is not None:
                    parsed.append(action)
                    if isinstance(action, NotifyAction) and raw_notify is None:
                        errors.append(f"{sp}[{i}].notify: needs {path}.notify (its broker)")
            actions[rule][state] = tuple(parsed)
    if errors:
        return None, errors
    return ReactorConfig(actions=actions, notify=notify, renotify=renotify), []


def validate(data: Any) -> tuple[bool, str]:
    """``(True, "...")`` for a good ``tributary_reactor`` config, else ``(False, errors)``;
    never raises."""
    try:
        cfg, errors = parse_config(data)
    except Exception as exc:  # validate() never raises
        return False, f"{CONFIG_KEY}: {exc}"
    if cfg is None:
        return False, "; ".join(errors)
    return True, f"{CONFIG_KEY}: {sum(len(s) for s in cfg.actions.values())} rules with actions"


def _expand(template: str, values: Mapping[str, str]) -> str:
    return string.Formatter().vformat(template, (), values)


def _event_values(tag: str, data: Any) -> tuple[dict[str, str] | None, str]:
    """The alert's names, checked, or None and why the event makes no reactions."""
    parts = tag.split("/") if isinstance(tag, str) else []
    if len(parts) != 4 or parts[:2] != ["tributary", "alert"]:
        return None, f"not an alert tag: {tag!r}"
    rule, state = parts[2], parts[3]
    if state not in STATES or not NAME_RE.fullmatch(rule):
        return None, f"not an alert tag: {tag!r}"
    if not isinstance(data, Mapping):
        return None, "event data is not a mapping"
    if "cmd" in data or "id" in data:
        return None, "a minion fired this event (its data carries cmd/id): not the relay's alert"
    if data.get("rule") != rule or data.get("state") != state:
        return None, "event data disagrees with its tag"
    gateway = data.get("gateway")
    if not isinstance(gateway, str) or not MINION_ID_RE.fullmatch(gateway):
        return None, f"gateway {gateway!r} is not a minion id"
    values = {"rule": rule, "state": state, "gateway": gateway}
    for key in ("site", "sensor", "metric", "severity"):
        v = data.get(key)
        values[key] = v if isinstance(v, str) and NAME_RE.fullmatch(v) else ""
    return values, ""


def _slot(template: str, values: Mapping[str, str]) -> str | None:
    """Expand ``template``; None when a field it names has no valid value in this event."""
    names = _fields_of(template) or []
    if any(not values.get(n) for n in names):
        return None
    return _expand(template, values)


def plan(cfg: ReactorConfig, tag: str, data: Any) -> tuple[dict[str, Any], list[str]]:
    """The reactions (Salt reactor high data) for one alert event, and why any were skipped."""
    values, why = _event_values(tag, data)
    if values is None:
        return {}, [why]
    assert isinstance(data, Mapping)
    if data.get("renotify") and not cfg.renotify:
        return {}, ["a re-notification (tributary_reactor.renotify is off)"]
    rule, state, gateway = values["rule"], values["state"], values["gateway"]
    out: dict[str, Any] = {}
    skipped: list[str] = []
    for i, action in enumerate(cfg.actions.get(rule, {}).get(state, ())):
        rid = f"tributary-reactor-{rule}-{state}-{i}"
        if isinstance(action, CommandAction):
            device = _slot(action.device, values)
            if device is None or not NAME_RE.fullmatch(device):
                skipped.append(f"{rid}: the event has no valid value for {action.device!r}")
                continue
            if action.devices and not any(fnmatch.fnmatchcase(device, g) for g in action.devices):
                skipped.append(f"{rid}: device {device!r} is not in {list(action.devices)}")
                continue
            args: list[dict[str, Any]] = [
                {"device": device},
                {"command": action.command},
                {"payload": action.payload},
            ]
            if action.timeout_s is not None:
                args.append({"timeout": action.timeout_s})
            out[f"{rid}-command"] = {
                "local.tributary.command": [
                    {"tgt": [gateway]},
                    {"tgt_type": "list"},
                    {"args": args},
                ]
            }
        elif isinstance(action, StateAction):
            if action.tgt == "gateway":
                tgt: Any = [gateway]
                tgt_type = "list"
            else:
                tgt, tgt_type = action.tgt, action.tgt_type
            sargs: list[dict[str, Any]] = [{"mods": list(action.mods)}]
            if action.test:
                sargs.append({"test": True})
            out[f"{rid}-state"] = {
                "local.state.apply": [{"tgt": tgt}, {"tgt_type": tgt_type}, {"args": sargs}]
            }
        else:
            template = action.topic or (cfg.notify.topic if cfg.notify else DEFAULT_TOPIC)
            topic = _slot(template, values)
            if topic is None:
                skipped.append(f"{rid}: the event has no valid value for {template!r}")
                continue
            message = {k: data[k] for k in MESSAGE_FIELDS if k in data}
            out[f"{rid}-notify"] = {
                "runner.tributary.notify": [{"args": [{"topic": topic}, {"message": message}]}]
            }
    return out, skipped


def reactions(opts: Mapping[str, Any], tag: str, data: Any) -> dict[str, Any]:
    """What the reactor SLS returns: :func:`plan` with the master's ``tributary_reactor``
    config; a bad config makes no reactions (and says why in the master log)."""
    import logging

    log = logging.getLogger(__name__)
    cfg, errors = parse_config(opts.get(CONFIG_KEY))
    if cfg is None:
        log.error("tributary reactor: bad config, no reactions: %s", "; ".join(errors))
        return {}
    out, skipped = plan(cfg, tag, data)
    for why in skipped:
        log.warning("tributary reactor: %s: %s", tag, why)
    return out
