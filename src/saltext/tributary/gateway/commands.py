"""Commands down to devices: publish on the site broker, wait for the device's answer.

    tributary:
      commands:
        topic: 'cmd/{device}/{command}'       # where a command is published (QoS 1)
        response_topic: 'cmd/{device}/reply'  # where the device answers
        timeout_s: 10                         # how long to wait for the answer
        devices: [boiler-1, valve-3]          # what this gateway serves (the grain lists them)

A command is a JSON message ``{"id": <correlation id>, "command": ..., "payload": ...,
"reply_to": <response topic>}``; the device answers on the response topic with the same
``id`` and ``"status": "ok"`` (done) or any other status (refused), plus what it wants to say.
The broker is the one the ``tributary_mqtt`` beacon reads (its ``broker`` block).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saltext.tributary.gateway.sources.mqtt import BrokerConfig, broker_password
from saltext.tributary.util import schema
from saltext.tributary.util.schema import option

NAME_RE = r"[A-Za-z0-9_.:@-]{1,128}"


@dataclass(frozen=True)
class CommandsConfig:
    topic: str = option("cmd/{device}/{command}", doc="publish template")
    response_topic: str = option("cmd/{device}/reply", doc="the device's answers")
    timeout_s: float = option(10.0, range=(0.1, 600), doc="how long to wait for the answer")
    qos: int = option(1, choices=(0, 1, 2))
    devices: list[str] | None = option(None, doc="the devices this gateway serves")


def parse_commands(data: Any) -> tuple[CommandsConfig | None, list[str]]:
    cfg, errors = schema.parse(CommandsConfig, data, "tributary:commands")
    if cfg is not None:
        for key in ("topic", "response_topic"):
            tpl = getattr(cfg, key)
            if "{device}" not in tpl or "#" in tpl or "+" in tpl:
                errors.append(f"tributary:commands.{key}: needs {{device}}, no wildcards")
        for i, d in enumerate(cfg.devices or []):
            if not re.fullmatch(NAME_RE, d):
                errors.append(f"tributary:commands.devices[{i}]: {d!r} is not a device name")
    return (cfg if not errors else None), errors


def send_command(
    broker: BrokerConfig,
    cfg: CommandsConfig,
    device: str,
    command: str,
    payload: Any = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Publish one command and wait (bounded) for the device's answer: ``outcome`` is
    ``acked``, ``refused`` (the device said no) or ``timeout``; ``answer`` is what it said."""
    import paho.mqtt.client as mqtt

    for what, value in (("device", device), ("command", command)):
        if not isinstance(value, str) or not re.fullmatch(NAME_RE, value):
            return {
                "result": False,
                "outcome": "invalid",
                "error": f"{what} {value!r} is not a name",
            }
    cid = uuid.uuid4().hex[:16]
    topic = cfg.topic.format(device=device, command=command)
    reply = cfg.response_topic.format(device=device, command=command)
    answered = threading.Event()
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
        if isinstance(data, Mapping) and data.get("id") == cid:
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
        return {"result": False, "outcome": "unreachable", "error": f"broker: {exc}"}
    client.loop_start()
    try:
        if not subscribed.wait(wait):
            return {"result": False, "outcome": "timeout", "error": "broker did not subscribe"}
        body = {"id": cid, "command": command, "payload": payload, "reply_to": reply}
        info = client.publish(topic, json.dumps(body), qos=cfg.qos)
        info.wait_for_publish(timeout=wait)
        if not answered.wait(wait):
            return {
                "result": False,
                "outcome": "timeout",
                "id": cid,
                "topic": topic,
                "error": f"no answer on {reply} within {wait:g} s",
            }
        ok = answer.get("status") == "ok"
        return {
            "result": ok,
            "outcome": "acked" if ok else "refused",
            "id": cid,
            "topic": topic,
            "answer": answer,
        }
    finally:
        client.loop_stop()
        client.disconnect()
