"""
Tributary MQTT beacon: subscribe to the site broker, spool every reading durably, emit batches.

Readings are numbered in the gateway spool before they are emitted; each beacon run emits the
next unsent batches (byte-capped) as ``salt/beacon/<minion id>/tributary_mqtt/batch`` events in
Tributary's compact wire format. The subscriber runs in background threads: a run never blocks.

Configuration (minion config or pillar)::

    beacons:
      tributary_mqtt:
        - broker:
            host: 127.0.0.1
            port: 1883
            # username: gateway
            # password: secret
            # tls_ca: /etc/mosquitto/certs/ca.crt
            inflight_window: 20   # the broker's max_inflight_messages (Mosquitto's default)
        - topics:
            - topic: "sensors/{sensor}/temperature"
              metric: temperature
              unit: C
              format: number
            - topic: "zigbee2mqtt/{sensor}"
              format: flat
            - topic: "env/{sensor}"
              format: json
              fields:
                env.temp: {metric: temperature, unit: C}
                env.hum: {metric: humidity, unit: "%"}
              timestamp: {field: ts, format: ms}
        - spool:
            max_bytes: 536870912
            max_age_s: 604800
        - batch:
            max_bytes: 32768
            max_run_bytes: 98304
            # a backlog larger than one run is sent by a thread of the minion, straight to
            # the master, in requests of drain_run_bytes that the master answers (README,
            # "Architecture": backlog drain); false: beacon runs only, one run a second
            drain: true
            drain_run_bytes: 524288
        - interval: 1

Per-sensor filters and a bandwidth budget (aggregate per sensor over windows instead of
dropping when the link is too slow; one budget per gateway, whichever beacon sets it)::

    beacons:
      tributary_mqtt:
        - broker:
            host: 127.0.0.1
        - topics:
            - topic: "senml/{sensor}"
              format: senml
            - topic: "lab/{sensor}/temperature_f"
              metric: temperature
              convert: F_to_C
        - filters:
            - match: "*/temperature"
              deadband: 0.2
              min_interval_s: 5
              max_interval_s: 300
              min: -40
              max: 125
        - bandwidth:
            bytes_per_s: 40
            window_s: 60

The ``site`` of the readings comes from the ``site`` grain unless ``- site: <name>`` is set.
"""

import logging

try:
    import saltext.tributary as tributary_pkg
    from saltext.tributary.gateway import beacons as gw_beacons
    from saltext.tributary.gateway import config as gw_config

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "tributary_mqtt"
__tributary_version__ = "0.1.0"


def __virtual__():
    if not HAS_LIBS:
        return (
            False,
            f"tributary_mqtt: saltext.tributary is not installed: {MISSING}",
        )
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def validate(config):
    """Validate the beacon configuration; returns ``(bool, message)`` and never raises."""
    return gw_config.validate_mqtt(config)


def beacon(config):
    """Emit the next unsent batches from the gateway spool (starting the subscriber if needed)."""
    return gw_beacons.run_mqtt_beacon(config, __opts__, __grains__)


def close(config):
    """Stop this beacon's subscriber threads (Salt calls this when the beacon is removed or
    disabled); other Tributary beacons keep running."""
    gw_beacons.close_beacon(config, __opts__, "tributary_mqtt")
