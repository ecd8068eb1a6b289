"""
Tributary health beacon: the gateway's heartbeat.

Each run spools the numeric health metrics as readings of sensor ``health`` (CPU temperature,
load, memory, disk, uptime, broker connectivity, spool depth and bytes, drops) in the gateway
spool, emits the next unsent batches, and returns one event tagged ``health``
(``salt/beacon/<minion id>/tributary_health/health``) with ``v``, ``epoch`` and ``last_seq``
of the spool plus every metric and counter: the top master uses ``last_seq`` to see a lost
tail. The heartbeat is signed like every batch, with the minion's own key
(``<pki_dir>/minion.pem``, field ``sig``), and the relay on the top master verifies it against
the gateway's accepted key before it touches the ledger: an unsigned or mis-signed heartbeat is
dead-lettered (unsigned ones are accepted only while the relay's ``allow_unsigned`` migration
switch is on). The logic lives in :mod:`saltext.tributary.gateway.sources.health` and
:mod:`saltext.tributary.gateway.beacons`.

Configuration (minion config or pillar)::

    beacons:
      tributary_health:
        - interval: 60

With every option::

    beacons:
      tributary_health:
        - root: /
        - disk_path: /var/cache/salt
        - sensor: health
        - spool_metrics: true
        - grains: [role, 'tributary:devices']   # carried in the signed heartbeat, for
                                                # alert rules matching on grains (at most 16)
        - spool:
            path: /var/cache/salt/minion/tributary/spool.db
            max_bytes: 536870912
            max_age_s: 604800
        - interval: 60
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
__virtualname__ = "tributary_health"
__tributary_version__ = "0.1.0"


def __virtual__():
    if not HAS_LIBS:
        return False, f"tributary_health: the saltext.tributary package is not installed: {MISSING}"
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def validate(config):
    """Validate the beacon configuration; returns ``(bool, message)`` and never raises."""
    return gw_config.validate_health(config)


def beacon(config):
    """Spool health metrics, emit the next unsent batches and the heartbeat event."""
    return gw_beacons.run_health_beacon(config, __opts__, __grains__)
