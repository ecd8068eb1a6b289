"""
Tributary sysfs beacon: hwmon, thermal zones, IIO and 1-Wire DS18B20 sensors on the gateway.

Each configured source is read at its own interval; readings pass the per-sensor filters, are
numbered in the gateway spool (the same spool as ``tributary_mqtt``: one epoch and sequence
per gateway) and the next unsent batches are emitted as
``salt/beacon/<minion id>/tributary_sysfs/batch`` events. The logic lives in
:mod:`saltext.tributary.gateway.sources.sysfs` and :mod:`saltext.tributary.gateway.beacons`.

Configuration (minion config or pillar)::

    beacons:
      tributary_sysfs:
        - root: /
        - sources:
            - kind: hwmon
              interval_s: 10
            - kind: thermal
              interval_s: 30
            - kind: iio
              interval_s: 5
              match: "bme280*"
            - kind: w1
              interval_s: 60
        - filters:
            - match: "28-*/temperature"
              deadband: 0.1
              max_interval_s: 600
              min: -55
              max: 125
        - interval: 1

A minimal configuration (CPU thermal zones only, a fake tree for tests)::

    beacons:
      tributary_sysfs:
        - root: /tmp/fake-sysfs
        - sources:
            - kind: thermal
        - spool:
            path: /var/cache/salt/minion/tributary/spool.db

``kind`` is one of hwmon, thermal, iio, w1; ``match`` is an fnmatch pattern on
``<sensor>/<metric>``; ``interval_s`` defaults to 10. ``spool``, ``batch``, ``bandwidth``,
``filters`` and ``site`` are as for ``tributary_mqtt``.
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
__virtualname__ = "tributary_sysfs"
__tributary_version__ = "0.1.0"


def __virtual__():
    if not HAS_LIBS:
        return False, f"tributary_sysfs: the saltext.tributary package is not installed: {MISSING}"
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def validate(config):
    """Validate the beacon configuration; returns ``(bool, message)`` and never raises."""
    return gw_config.validate_sysfs(config)


def beacon(config):
    """Read the due sensors, spool them, emit the next unsent batches."""
    return gw_beacons.run_sysfs_beacon(config, __opts__, __grains__)
