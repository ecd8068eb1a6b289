"""A simulated device for command tests: a real paho MQTT client on a gateway's broker that
obeys the Tributary command protocol (``{"id", "command", "payload", "reply_to"}`` in, an answer
with the same ``id`` on ``reply_to`` out), and a listener that records everything published
under ``cmd/#`` on a broker (to prove a gateway was sent nothing)."""

from __future__ import annotations

import json
import threading
from typing import Any


def _client(port: int, client_id: str, subscribe: str, on_message: Any) -> Any:
    import paho.mqtt.client as mqtt

    ready = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.on_connect = lambda c, *a: c.subscribe(subscribe, qos=1)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not ready.wait(15):
        client.loop_stop()
        raise RuntimeError(f"{client_id}: no subscription to {subscribe} on :{port} in 15 s")
    return client


class CommandDevice:
    """Answers commands on ``cmd/<name>/+``: ``ok`` with what it did for the commands in
    ``obeys``, ``refused`` (reason ``interlock``) for the others."""

    def __init__(self, port: int, name: str, obeys: tuple[str, ...] = ("setpoint",)) -> None:
        self.name = name
        self.obeys = obeys
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = _client(port, f"dev-{name}", f"cmd/{name}/+", self.on_message)

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/reply"):
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.seen.append(body)
        if body.get("command") in self.obeys:
            answer = {"id": body["id"], "status": "ok", "did": body["command"]}
            answer["value"] = body.get("payload")
        else:
            answer = {"id": body.get("id"), "status": "refused", "reason": "interlock"}
        client.publish(str(body.get("reply_to")), json.dumps(answer), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Listener:
    """Records every message published under ``cmd/#`` on a broker."""

    def __init__(self, port: int, client_id: str = "cmd-listener") -> None:
        self.topics: list[str] = []
        self.client = _client(port, client_id, "cmd/#", self.on_message)

    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.topics.append(msg.topic)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
