"""
Tributary on a gateway: inspect and operate the telemetry spool with ``salt-call``.

The logic lives in :mod:`saltext.tributary.gateway.operations`; this module is the Salt face of it.
"""

import logging

try:
    import saltext.tributary as tributary_pkg
    from saltext.tributary.gateway import operations as gw_ops
    from saltext.tributary.protocol.wire import row_count

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "tributary"
__tributary_version__ = "0.1.0"


def __virtual__():
    if not HAS_LIBS:
        return False, f"tributary: the saltext.tributary package is not installed: {MISSING}"
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def status():
    """
    Sources, counters (received, rejected by reason, spooled, emitted, dropped), spool depth,
    epoch, last sequence and broker connection of this gateway.

    CLI Example:

    .. code-block:: bash

        salt-call tributary.status
        salt -G 'site:brisbane' tributary.status
    """
    return gw_ops.status(__opts__, __pillar__)


def replay(epoch, from_seq, to_seq, pace=0.05):
    """
    Re-emit the readings ``from_seq``..``to_seq`` of ``epoch`` from this gateway's spool, in
    byte-capped batches, ``pace`` seconds apart. Elasticsearch ids are deterministic, so a
    range that is already indexed creates no new documents. An unknown epoch or a range the
    spool no longer holds answers with an error that says what is held.

    Each batch goes to the master in a request of its own that the master answers
    (``event.fire_master`` with a preload), not through the minion's event bus: the minion
    process silently drops bus events while it believes its master is disconnected, and a
    replay that reports success must have been delivered.

    CLI Example:

    .. code-block:: bash

        salt-call tributary.replay 3f9c2a1b7d10 1 500
        salt gw-brisbane-1 tributary.replay 3f9c2a1b7d10 1200 1300
    """
    import time

    from saltext.tributary.gateway.spool import SpoolError

    try:
        batches = gw_ops.replay_batches(
            __opts__, __pillar__, __grains__, str(epoch), int(from_seq), int(to_seq)
        )
    except (SpoolError, ValueError) as exc:
        return {"result": False, "error": str(exc)}
    tag = "salt/beacon/{}/tributary_replay/batch".format(__opts__["id"])
    sent = 0
    for n, batch in enumerate(batches):
        if n:
            time.sleep(float(pace))
        # A preload makes event.fire_master send a request of its own and wait for the
        # master's answer (an empty preload would be falsy and take the bus path).
        if not __salt__["event.fire_master"](batch, tag, preload={"tributary": "replay"}):
            return {"result": False, "error": f"event.fire_master failed after {sent} readings"}
        sent += row_count(batch)
    return {"result": True, "epoch": str(epoch), "batches": len(batches), "readings": sent}


def read(sensor=None):
    """
    Read the sources now, without spooling or emitting, for field checks. sysfs and health
    sources are read fresh; MQTT sensors push, so their newest received reading is shown.
    ``sensor`` is an fnmatch pattern on the sensor name or ``<sensor>/<metric>``.

    CLI Example:

    .. code-block:: bash

        salt-call tributary.read
        salt-call tributary.read '28-*'
        salt -G 'tributary:sensors:temperature' tributary.read
    """
    return gw_ops.read_now(__opts__, __pillar__, sensor)


def tail(n=10, aside=False):
    """
    The last ``n`` readings in the gateway spool (sequence, sensor key, unit, time, value);
    with ``aside=True`` the last ``n`` readings set aside as implausible (sensor key, time,
    value, reason).

    CLI Example:

    .. code-block:: bash

        salt-call tributary.tail
        salt-call tributary.tail 50
        salt-call tributary.tail 20 aside=True
    """
    return gw_ops.tail(__opts__, __pillar__, int(n), aside=bool(aside))


def trim():
    """
    Apply the spool's retention budget (age and bytes) now; oldest readings go first and
    never-sent readings that had to go are counted as dropped.

    CLI Example:

    .. code-block:: bash

        salt-call tributary.trim
    """
    return gw_ops.trim(__opts__, __pillar__)


def reset_counters():
    """
    Zero the spool's counters (received, rejected, filtered, spooled, emitted, dropped, ...);
    returns the values they had.

    CLI Example:

    .. code-block:: bash

        salt-call tributary.reset_counters
    """
    return gw_ops.reset_counters(__opts__, __pillar__)


def command(device, command, payload=None, timeout=None, test=False, **kwargs):
    """
    Send a command to a device this gateway serves, through the site broker, and wait for its
    answer: publishes ``{"id", "command", "payload", "reply_to"}`` (QoS 1) on the configured
    topic (``tributary:commands:topic``, default ``cmd/{device}/{command}``) and waits, at most
    ``timeout`` seconds (``tributary:commands:timeout_s``), for the device's answer with the
    same id on the response topic.

    Only what the allow-list (``tributary:commands:allow`` in pillar or the minion config)
    allows is sent, within the per-device rate limit (``tributary:commands:rate``); otherwise
    ``outcome`` is ``refused`` and ``reason`` names the rule or limit, and nothing is
    published. ``test=True`` checks the same and returns what would be sent (topic, message,
    QoS, correlation id) without publishing. ``outcome``: ``acked``, ``refused_by_device``
    (its answer is returned), ``refused``, ``timeout``, ``test`` or ``error``.

    Every command and its outcome (with the Salt user and job id that sent it, the answer
    and the latency) is recorded in the gateway spool and shipped, signed, to the
    ``tributary-commands-*`` index (``audit`` in the return says where it was recorded).

    CLI Example:

    .. code-block:: bash

        salt-call tributary.command boiler-1 setpoint 70
        salt-call tributary.command boiler-1 setpoint 70 test=True
        salt -G 'tributary:devices:boiler-1' tributary.command boiler-1 setpoint 70 timeout=5
    """
    import getpass

    user = kwargs.get("__pub_user")
    if not user:
        try:
            user = f"salt-call:{getpass.getuser()}"
        except Exception:  # no user name for this uid
            user = "salt-call"
    return gw_ops.command(
        __opts__,
        __pillar__,
        str(device),
        str(command),
        payload,
        timeout,
        test=test is True or str(test).lower() == "true",
        user=str(user),
        jid=str(kwargs["__pub_jid"]) if kwargs.get("__pub_jid") else None,
    )
