"""
Tributary on a gateway: inspect and operate the telemetry spool with ``salt-call``.

The logic lives in :mod:`saltext.tributary.gateway`; this module is the Salt face of it.
"""

import logging

try:
    from saltext.tributary import gateway

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "tributary"


def __virtual__():
    if not HAS_LIBS:
        return False, f"tributary: the saltext.tributary package is not installed: {MISSING}"
    return __virtualname__


def status():
    """
    Sources, counters (received, rejected by reason, spooled, emitted, dropped), spool depth,
    epoch, last sequence and broker connection of this gateway.

    CLI Example:

    .. code-block:: bash

        salt-call tributary.status
        salt -G 'site:brisbane' tributary.status
    """
    return gateway.status(__opts__, __pillar__)
