"""Alert notifications to an upstream MQTT broker (the ``tributary.notify`` runner)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from saltext.tributary.gateway.sources.mqtt import broker_password
from saltext.tributary.reactor.actions import CONFIG_KEY, NotifyConfig, parse_config


def notify_config(opts: Mapping[str, Any]) -> tuple[NotifyConfig | None, str]:
    cfg, errors = parse_config(opts.get(CONFIG_KEY))
    if cfg is None:
        return None, "; ".join(errors)
    if cfg.notify is None:
        return None, f"{CONFIG_KEY}.notify: not configured (its broker)"
    return cfg.notify, ""


def publish(cfg: NotifyConfig, topic: str, message: Any) -> dict[str, Any]:
    """Publish ``message`` as JSON on ``topic`` with the configured QoS and wait (bounded) until
    the broker has it (PUBACK for QoS 1)."""
    import paho.mqtt.client as mqtt

    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        return {"result": False, "error": f"topic {topic!r}: must be a topic without wildcards"}
    try:
        body = json.dumps(message, default=str)
    except (TypeError, ValueError) as exc:
        return {"result": False, "error": f"message: {exc}"}
    b = cfg.broker
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            refused.append(str(rc))
        connected.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"tributary-notify-{uuid.uuid4().hex[:12]}",
        clean_session=True,
    )
    if b.username:
        client.username_pw_set(b.username, broker_password(b))
    if b.tls_ca:
        client.tls_set(ca_certs=b.tls_ca)
    client.on_connect = on_connect
    try:
        client.connect(b.host, b.port, b.keepalive)
    except OSError as exc:
        return {"result": False, "error": f"broker {b.host}:{b.port}: {exc}"}
    client.loop_start()
    try:
        if not connected.wait(cfg.timeout_s):
            return {"result": False, "error": f"broker {b.host}:{b.port}: no CONNACK"}
        if refused:
            return {"result": False, "error": f"broker {b.host}:{b.port}: {refused[0]}"}
        info = client.publish(topic, body, qos=cfg.qos)
        try:
            info.wait_for_publish(timeout=cfg.timeout_s)
        except (RuntimeError, ValueError) as exc:
            return {"result": False, "error": f"not published: {exc}"}
        if not info.is_published():
            return {"result": False, "error": f"not published within {cfg.timeout_s:g} s"}
        return {"result": True, "topic": topic, "qos": cfg.qos, "bytes": len(body)}
    finally:
        client.loop_stop()
        client.disconnect()
