"""Commands down to devices: publish on the site broker, wait for the device's answer.

    tributary:
      commands:
        topic: 'cmd/{device}/{command}'       # where a command is published (QoS 1)
        response_topic: 'cmd/{device}/reply'  # where the device answers
        timeout_s: 10                         # how long to wait for the answer
        devices: [boiler-1, valve-3]          # what this gateway serves (the grain lists them)
        allow:                                # the allow-list: no rule, no command
          - device: 'boiler-*'                # fnmatch glob on the device name
            commands: [setpoint]              # globs on the command name
            payload: {type: number, min: 40, max: 90, max_bytes: 32}
          - device: 'valve-*'
            commands: [open, close]
            payload: {type: none}             # no payload at all
        rate: {max: 10, window_s: 60}         # per device, for every caller on this gateway

Safety (:func:`check_command`): the first rule of ``allow`` whose ``device`` glob and one of
whose ``commands`` globs match decides; its ``payload`` limits (``type``: ``any``, ``none``,
``number``, ``integer``, ``string``, ``bool``; ``min``/``max`` for numbers; ``max_bytes`` of the
payload as JSON, 256 by default) must hold. Without ``allow`` every command is refused. A
refused command is never published and says which rule or limit refused it.

A command is a JSON message ``{"id": <correlation id>, "command": ..., "payload": ...,
"reply_to": <response topic>}``; the device answers on the response topic with the same
``id`` and ``"status": "ok"`` (done) or any other status (refused), plus what it wants to say.
The broker is the one the ``tributary_mqtt`` beacon reads (its ``broker`` block).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.gateway.sources.mqtt import BrokerConfig, broker_password
from saltext.tributary.util import schema
from saltext.tributary.util.schema import option

NAME_RE = r"[A-Za-z0-9_.:@-]{1,128}"
#: Where the commands configuration lives (pillar, else minion config); errors name it.
ROOT = "tributary:commands"
#: Outcomes of a command (and of its audit record).
OUTCOMES = ("acked", "refused_by_device", "refused", "timeout", "test", "error")
PAYLOAD_TYPES = ("any", "none", "number", "integer", "string", "bool")


@dataclass(frozen=True)
class PayloadLimits:
    type: str = option("any", choices=PAYLOAD_TYPES, doc="what the payload must be")
    min: float | None = option(None, doc="numbers: lowest allowed")
    max: float | None = option(None, doc="numbers: highest allowed")
    max_bytes: int = option(256, range=(1, 4096), doc="the payload as JSON, at most")


@dataclass(frozen=True)
class AllowRule:
    device: str | None = option(None, doc="glob on the device name (required)")
    commands: list[str] | None = option(None, doc="globs on the command name (required)")
    payload: PayloadLimits = option(PayloadLimits)


@dataclass(frozen=True)
class RateLimit:
    max: int = option(10, range=(1, 100_000), doc="commands per device per window")
    window_s: float = option(60.0, range=(0.1, 86400), doc="the window")


@dataclass(frozen=True)
class CommandsConfig:
    topic: str = option("cmd/{device}/{command}", doc="publish template")
    response_topic: str = option("cmd/{device}/reply", doc="the device's answers")
    timeout_s: float = option(10.0, range=(0.1, 600), doc="how long to wait for the answer")
    qos: int = option(1, choices=(0, 1, 2))
    devices: list[str] | None = option(None, doc="the devices this gateway serves")
    allow: list[dict] | None = option(None, doc="the allow-list (rules, first match decides)")
    rate: RateLimit = option(RateLimit)
    #: ``allow`` parsed (set by :func:`parse_commands`)
    rules: tuple[AllowRule, ...] = field(default=(), init=False, compare=False)


def parse_commands(data: Any) -> tuple[CommandsConfig | None, list[str]]:
    cfg, errors = schema.parse(CommandsConfig, data, ROOT)
    if cfg is not None:
        for key in ("topic", "response_topic"):
            tpl = getattr(cfg, key)
            if "{device}" not in tpl or "#" in tpl or "+" in tpl:
                errors.append(f"{ROOT}.{key}: needs {{device}}, no wildcards")
        for i, d in enumerate(cfg.devices or []):
            if not re.fullmatch(NAME_RE, d):
                errors.append(f"{ROOT}.devices[{i}]: {d!r} is not a device name")
        rules = []
        for i, item in enumerate(cfg.allow or []):
            rule, errs = parse_rule(item, f"{ROOT}.allow[{i}]")
            errors += errs
            if rule is not None:
                rules.append(rule)
        object.__setattr__(cfg, "rules", tuple(rules))
    return (cfg if not errors else None), errors


def parse_rule(data: Any, path: str) -> tuple[AllowRule | None, list[str]]:
    """One allow-list rule, every problem named with its key path."""
    rule, errors = schema.parse(AllowRule, data, path)
    if rule is None:
        return None, errors
    if rule.device is None:
        errors.append(f"{path}.device: required (a glob on the device name)")
    if rule.commands is None:
        errors.append(f"{path}.commands: required (a list of globs on the command name)")
    lim = rule.payload
    if lim.min is not None and lim.max is not None and lim.min > lim.max:
        errors.append(f"{path}.payload.min: {lim.min:g} is above max {lim.max:g}")
    if (lim.min is not None or lim.max is not None) and lim.type not in ("number", "integer"):
        errors.append(f"{path}.payload.type: min/max need type number or integer")
    return (rule if not errors else None), errors


@dataclass(frozen=True)
class Verdict:
    """What the allow-list says of one command: ``rule`` names the rule that decided."""

    allowed: bool
    reason: str
    rule: str | None = None


def check_payload(lim: PayloadLimits, payload: Any, path: str) -> str | None:
    """None when ``payload`` is within ``lim``, else the reason naming the limit."""
    where = f"{path}.payload"
    try:
        size = len(json.dumps(payload, separators=(",", ":")).encode())
    except (TypeError, ValueError):
        return f"{where}: the payload is not JSON"
    if lim.type == "none":
        return None if payload is None else f"{where}.type: this command takes no payload"
    if payload is None:
        return (
            None if lim.type == "any" else f"{where}.type: a payload of type {lim.type} is required"
        )
    if size > lim.max_bytes:
        return f"{where}.max_bytes: the payload is {size} bytes of JSON, over {lim.max_bytes}"
    number = isinstance(payload, (int, float)) and not isinstance(payload, bool)
    if lim.type in ("number", "integer"):
        what = "an integer" if lim.type == "integer" else "a finite number"
        if not number or not math.isfinite(payload):
            return f"{where}.type: {payload!r} is not {what}"
        if lim.type == "integer" and not float(payload).is_integer():
            return f"{where}.type: {payload!r} is not {what}"
        if lim.min is not None and payload < lim.min:
            return f"{where}.min: {payload!r} is below {lim.min:g}"
        if lim.max is not None and payload > lim.max:
            return f"{where}.max: {payload!r} is above {lim.max:g}"
    elif lim.type == "string" and not isinstance(payload, str):
        return f"{where}.type: {payload!r} is not a string"
    elif lim.type == "bool" and not isinstance(payload, bool):
        return f"{where}.type: {payload!r} is not true or false"
    return None


def check_command(cfg: CommandsConfig, device: str, command: str, payload: Any) -> Verdict:
    """The allow-list's verdict on one command (pure): the first rule whose device glob and one
    of whose command globs match decides, and its payload limits must hold."""
    for what, value in (("device", device), ("command", command)):
        if not isinstance(value, str) or not re.fullmatch(NAME_RE, value):
            return Verdict(False, f"{what} {value!r} is not a name ([A-Za-z0-9_.:@-]{{1,128}})")
    if cfg.devices is not None and device not in cfg.devices:
        return Verdict(False, f"{ROOT}.devices: {device!r} is not a device this gateway serves")
    if cfg.allow is None:
        return Verdict(False, f"{ROOT}.allow is not set: every command is refused")
    for i, rule in enumerate(cfg.rules):
        path = f"{ROOT}.allow[{i}]"
        if not fnmatch.fnmatchcase(device, rule.device or ""):
            continue
        if not any(fnmatch.fnmatchcase(command, c) for c in rule.commands or ()):
            continue
        why = check_payload(rule.payload, payload, path)
        if why is not None:
            return Verdict(False, why, path)
        return Verdict(True, f"allowed by {path}", path)
    return Verdict(False, f"{ROOT}.allow: no rule allows command {command!r} for device {device!r}")


def rate_reason(cfg: CommandsConfig, device: str, seen: int) -> str:
    r = cfg.rate
    return (
        f"{ROOT}.rate: {seen} commands to {device!r} within the last {r.window_s:g} s"
        f" (at most {r.max})"
    )


def new_correlation_id() -> str:
    """16 hex digits, new for every command."""
    return uuid.uuid4().hex[:16]


def plan_command(
    cfg: CommandsConfig, device: str, command: str, payload: Any, cid: str | None = None
) -> dict[str, Any]:
    """What would be published (``test=True`` returns this): topic, message, QoS, where the
    answer is awaited and for how long."""
    cid = cid or new_correlation_id()
    reply = cfg.response_topic.format(device=device, command=command)
    return {
        "topic": cfg.topic.format(device=device, command=command),
        "qos": cfg.qos,
        "message": {"id": cid, "command": command, "payload": payload, "reply_to": reply},
        "response_topic": reply,
        "correlation_id": cid,
        "correlation_id_shape": "16 hex digits, new for every command",
        "timeout_s": cfg.timeout_s,
    }


def send_command(
    broker: BrokerConfig,
    cfg: CommandsConfig,
    device: str,
    command: str,
    payload: Any = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Publish one command and wait (bounded) for the device's answer: ``outcome`` is
    ``acked``, ``refused_by_device`` (the device said no), ``timeout``, or ``error`` (the broker
    could not be used); ``answer`` is what the device said, ``latency_ms`` the time from
    publishing to its answer. The allow-list is not consulted here (see
    :func:`check_command`)."""
    import paho.mqtt.client as mqtt

    for what, value in (("device", device), ("command", command)):
        if not isinstance(value, str) or not re.fullmatch(NAME_RE, value):
            return {
                "result": False,
                "outcome": "refused",
                "reason": f"{what} {value!r} is not a name",
                "error": f"{what} {value!r} is not a name",
            }
    cid = new_correlation_id()
    topic = cfg.topic.format(device=device, command=command)
    reply = cfg.response_topic.format(device=device, command=command)
    answered = threading.Event()
    answered_at = [0.0]
    subscribed = threading.Event()
    answer: dict[str, Any] = {}

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(reply, qos=cfg.qos)

    def on_subscribe(*_args: Any) -> None:
        subscribed.set()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(data, Mapping) and data.get("id") == cid and not answered.is_set():
            answered_at[0] = time.monotonic()
            answer.update(data)
            answered.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"tributary-cmd-{cid}", clean_session=True
    )
    if broker.username:
        client.username_pw_set(broker.username, broker_password(broker))
    if broker.tls_ca:
        client.tls_set(ca_certs=broker.tls_ca)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    wait = cfg.timeout_s if timeout_s is None else float(timeout_s)
    try:
        client.connect(broker.host, broker.port, broker.keepalive)
    except OSError as exc:
        why = f"broker {broker.host}:{broker.port}: {exc}"
        return {"result": False, "outcome": "error", "reason": why, "error": why}
    client.loop_start()
    try:
        if not subscribed.wait(wait):
            why = "the broker did not confirm the subscription to the response topic"
            return {"result": False, "outcome": "error", "reason": why, "error": why}
        body = {"id": cid, "command": command, "payload": payload, "reply_to": reply}
        started = time.monotonic()
        info = client.publish(topic, json.dumps(body), qos=cfg.qos)
        info.wait_for_publish(timeout=wait)
        if not answered.wait(wait):
            why = f"no answer on {reply} within {wait:g} s"
            return {
                "result": False,
                "outcome": "timeout",
                "id": cid,
                "topic": topic,
                "reason": why,
                "latency_ms": round((time.monotonic() - started) * 1000, 1),
                "error": why,
            }
        latency = round((answered_at[0] - started) * 1000, 1)
        ok = answer.get("status") == "ok"
        out = {
            "result": ok,
            "outcome": "acked" if ok else "refused_by_device",
            "id": cid,
            "topic": topic,
            "answer": answer,
            "latency_ms": latency,
        }
        if not ok:
            out["reason"] = f"the device answered status {answer.get('status')!r}"
        return out
    finally:
        client.loop_stop()
        client.disconnect()
