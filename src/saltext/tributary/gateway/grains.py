"""The ``tributary`` grain: site, role, hardware model and the sensors present."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from saltext.tributary.gateway.config import parse_mqtt, parse_sysfs, parsed, spool_path
from saltext.tributary.gateway.operations import find_beacon_configs
from saltext.tributary.gateway.sources.payload import TopicRule
from saltext.tributary.gateway.sources.sysfs import SysfsSource
from saltext.tributary.gateway.spool import GatewaySpool

log = logging.getLogger(__name__)


def hardware_model(root: str = "/") -> str:
    for rel in (
        "proc/device-tree/model",
        "sys/firmware/devicetree/base/model",
        "sys/class/dmi/id/product_name",
    ):
        try:
            with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as fh:
                text = fh.read().strip("\x00\n ")
            if text:
                return text
        except OSError:
            continue
    import platform

    return platform.machine() or "unknown"


def grains(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tributary`` grain: site, role, hardware model and the sensors present.

    ``sensors`` lists metric kinds (``temperature``, ``humidity``, ...), so
    ``salt -G 'tributary:sensors:temperature'`` targets gateways with a temperature sensor;
    ``sensor_ids`` lists ``<sensor>/<metric>`` keys; ``devices`` the sensors and the devices
    it sends commands to (``tributary:commands:devices`` in the minion config), so
    ``salt -G 'tributary:devices:boiler-1' tributary.command boiler-1 setpoint 70`` reaches the
    gateway that serves boiler-1.
    """
    static = opts.get("grains") or {}
    configs = find_beacon_configs(opts, {})
    keys: set[str] = set()
    metrics: set[str] = set()
    site = static.get("site")
    for cfg in configs.values():
        site = site or cfg.get("site")
        mod = cfg["_module"]
        try:
            if mod == "tributary_sysfs":
                sysfs = parsed(mod, parse_sysfs, cfg)
                src = SysfsSource(sysfs.root, sysfs.sources)
                src._refresh(0.0)
                keys.update(s.key for s in src.sensors)
            elif mod == "tributary_mqtt":
                mqtt = parsed(mod, parse_mqtt, cfg)
                for rule in (TopicRule.from_options(t) for t in mqtt.topics):
                    if rule.metric and "{" not in rule.metric:
                        metrics.add(rule.metric)
                    metrics.update(f.metric for f in rule.fields)
            path = spool_path(cfg, opts)
            if os.path.exists(path) and mod != "tributary_health":
                spool = GatewaySpool(path)
                try:
                    keys.update(k for k in spool.sensor_keys() if not k.startswith("health/"))
                finally:
                    spool.close()
        except Exception as exc:  # grains must never fail the minion
            log.warning("tributary grains: %s: %s", cfg.get("_beacon_name"), exc)
    metrics.update(k.rsplit("/", 1)[1] for k in keys)
    # devices: the sensors it reads and the devices it sends commands to
    commands = (opts.get("tributary") or {}).get("commands") or {}
    devices = {k.rsplit("/", 1)[0] for k in keys}
    if isinstance(commands, dict) and isinstance(commands.get("devices"), list):
        devices.update(str(d) for d in commands["devices"])
    return {
        "devices": sorted(devices),
        "site": site,
        "role": static.get("role") or ("gateway" if configs else None),
        "hardware": hardware_model(),
        "sensors": sorted(metrics),
        "sensor_ids": sorted(keys),
        "sources": sorted(c["_module"] for c in configs.values()),
    }
