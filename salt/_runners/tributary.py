"""
Tributary on the top master: where every reading is.

The logic lives in :mod:`saltext.tributary.relay`; this runner is its Salt face.
"""

import logging

try:
    from saltext.tributary import relay as relay_lib

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)

log = logging.getLogger(__name__)
__virtualname__ = "tributary"


def __virtual__():
    if not HAS_LIBS:
        return False, f"tributary runner: the saltext.tributary package is not installed: {MISSING}"
    return __virtualname__


def status():
    """
    The relay on this master: spool depth and age, and its counters (events in, batches in,
    duplicate events, readings in, indexed, already present, dead-lettered, retried).

    CLI Example:

    .. code-block:: bash

        salt-run tributary.status
    """
    return {"relay": relay_lib.status_from_opts(__opts__)}
