"""The closed loop's simulated device and an MQTT listener (tests/integration/test_reactor.py
and bench/reaction.py): real paho clients on real brokers."""

from __future__ import annotations

import json
import threading
import time


class Boiler:
    """A device on a gateway's broker: publishes ``sensors/<name>/temperature`` (QoS 1) every
    ``period`` s, its output moving towards ``target`` by at most ``step`` per reading;
    answers ``setpoint`` commands on ``cmd/<name>/+`` with ``ok`` and takes the setpoint as its
    new target (anything else: ``refused``). ``crossed_at`` is when it published its first
    reading above ``watch_above`` (None until then)."""

    def __init__(
        self,
        port: int,
        name: str,
        output: float,
        period: float = 0.2,
        step: float = 5.0,
        watch_above: float | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.name, self.output, self.target = name, output, output
        self.period, self.step, self.watch_above = period, step, watch_above
        self.crossed_at: float | None = None
        self.commands: list[dict] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{name}")
        self.client.on_connect = lambda c, *a: c.subscribe(f"cmd/{name}/+", qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.ready.wait(15):
            self.client.loop_stop()
            raise RuntimeError(f"device {name}: no subscription on :{port} in 15 s")
        self.thread = threading.Thread(target=self.run, name=f"dev-{name}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self._stop.wait(self.period):
            delta = max(-self.step, min(self.step, self.target - self.output))
            self.output = round(self.output + delta, 1)
            now = time.time()
            self.client.publish(f"sensors/{self.name}/temperature", str(self.output), qos=1)
            if (
                self.watch_above is not None
                and self.crossed_at is None
                and self.output > self.watch_above
            ):
                self.crossed_at = now

    def on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/reply"):
            return
        received = time.time()
        body = json.loads(msg.payload)
        self.commands.append({**body, "received": received})
        if body.get("command") == "setpoint" and isinstance(body.get("payload"), (int, float)):
            self.target = float(body["payload"])
            answer = {"id": body["id"], "status": "ok", "setpoint": self.target}
        else:
            answer = {"id": body["id"], "status": "refused", "reason": "unknown command"}
        client.publish(body["reply_to"], json.dumps(answer), qos=1)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


class Listener:
    """Everything published under ``topic`` on a broker (paho, QoS 1), JSON payloads."""

    def __init__(self, port: int, topic: str, client_id: str = "ops-listener") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, json.loads(m.payload))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(15):
            self.client.loop_stop()
            raise RuntimeError(f"{client_id}: no subscription to {topic} on :{port} in 15 s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
