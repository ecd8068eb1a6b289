"""
Tributary grains: ``tributary`` with site, role, hardware model and the sensors present.

``sensors`` lists the metric kinds the configured sources provide, so::

    salt -G 'tributary:sensors:temperature' tributary.read

addresses every gateway with a temperature sensor. The logic lives in
:func:`saltext.tributary.gateway.grains.grains`.
"""

import logging

try:
    import saltext.tributary as tributary_pkg
    from saltext.tributary.gateway import grains as gw_grains

    HAS_LIBS = True
except ImportError:
    HAS_LIBS = False

log = logging.getLogger(__name__)
__virtualname__ = "tributary"
__tributary_version__ = "0.1.0"


def __virtual__():
    if not HAS_LIBS:
        return False, "tributary grains: the saltext.tributary package is not installed"
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def tributary():
    """The ``tributary`` grain (never raises: a broken source config yields fewer sensors)."""
    try:
        return {"tributary": gw_grains.grains(__opts__)}
    except Exception as exc:  # grains must never break the minion
        log.warning("tributary grains failed: %s", exc)
        return {}
