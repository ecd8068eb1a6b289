"""A sensor simulator: publishes real MQTT messages (paho, QoS 1) to a gateway's broker."""

from __future__ import annotations

import json
import math
import random
import threading
import time

import paho.mqtt.client as mqtt

SENSORS = {
    # sensor id: (metric, base, amplitude); units come from the gateways' topic rules
    "boiler-1": ("temperature", 65.0, 4.0),
    "room-1": ("temperature", 21.0, 1.5),
    "tank-1": ("level", 70.0, 10.0),
}


class Simulator(threading.Thread):
    """Publishes one reading per sensor every ``period`` seconds until stopped."""

    def __init__(self, port: int, name: str, period: float = 0.1, seed: int = 1) -> None:
        super().__init__(name=f"sim-{name}", daemon=True)
        self.port = port
        self.period = period
        self.rng = random.Random(seed)
        self.published = 0
        self._stop_evt = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-{name}")
        self.client.max_queued_messages_set(0)

    def run(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        t = 0
        try:
            while not self._stop_evt.wait(self.period):
                t += 1
                for sensor, (metric, base, amp) in SENSORS.items():
                    value = base + amp * math.sin(t / 50) + self.rng.gauss(0, amp / 10)
                    if sensor == "room-1":
                        payload = json.dumps(
                            {
                                "ts": int(time.time() * 1000),
                                "temp": round(value, 2),
                                "env": {"hum": round(45 + value / 3, 1)},
                            }
                        )
                        info = self.client.publish(f"json/{sensor}", payload, qos=1)
                        self.published += 2
                    else:
                        info = self.client.publish(
                            f"sensors/{sensor}/{metric}", f"{value:.2f}", qos=1
                        )
                        self.published += 1
                    info.wait_for_publish(timeout=10)
        finally:
            self.client.loop_stop()
            self.client.disconnect()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=15)
