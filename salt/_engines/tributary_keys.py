"""
Tributary key publisher (syndic masters): tell the top master which gateway keys are accepted.

The relay on the top master verifies each batch's signature against its gateway's *accepted*
public key, but behind a syndic those keys live on the syndic master. This engine reads the
syndic master's accepted keys (``<pki_dir>/minions``) and fires ``tributary/keys/<syndic id>``
with all of them, signed with the syndic's own key (the one the top master accepted for the
syndic), so no gateway can forge a key set. salt-syndic forwards the event to the top master.
It publishes at start, every ``interval`` seconds, and soon after this master's accepted keys
change (a ``salt/key`` event, then only if the keys really changed, at most once per
``min_gap_s``), so a deleted key stops verifying quickly and a minion firing look-alike tags
cannot make it sign in a loop.

Configuration (syndic master config)::

    engines:
      - tributary_keys:
          interval: 60                               # seconds between full publications
          min_gap_s: 2                               # least time between two publications
          # syndic_id: syndic-1                      (default: the syndic's minion id)
          # signing_key: /etc/salt/pki/minion/minion.pem   (the key salt-syndic authenticates
          #                                                 with; default: <pki_dir>/minion.pem,
          #                                                 then /etc/salt/pki/minion/minion.pem)
"""

import logging
import os

try:
    import saltext.tributary as tributary_pkg
    from saltext.tributary.syndic import keys as keys_lib

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)

import salt.utils.event

log = logging.getLogger(__name__)
__virtualname__ = "tributary_keys"
__tributary_version__ = "0.1.0"
RETRY_S = 2.0


def __virtual__():
    if not HAS_LIBS:
        return False, f"tributary_keys: saltext.tributary is not installed: {MISSING}"
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def validate(config):
    """Validate the engine configuration; returns ``(bool, message)`` and never raises."""
    return keys_lib.validate(config)


def _signing_key(cfg):
    if cfg.signing_key:
        return cfg.signing_key
    for path in (
        os.path.join(__opts__["pki_dir"], "minion.pem"),
        "/etc/salt/pki/minion/minion.pem",
    ):
        if os.path.exists(path):
            return path
    return os.path.join(__opts__["pki_dir"], "minion.pem")


def start(**config):
    """Publish this master's accepted keys upward until the master stops."""
    cfg, errors = keys_lib.parse_keys(config)
    if cfg is None:
        msg = "tributary_keys: " + "; ".join(errors)
        log.error("%s: not starting", msg)
        raise ValueError(msg)
    publisher = keys_lib.KeyPublisher(
        __opts__["pki_dir"],
        cfg.syndic_id or __opts__.get("id"),
        _signing_key(cfg),
        interval=cfg.interval,
        min_gap_s=cfg.min_gap_s,
    )
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=True) as bus:
        while True:
            ev = bus.get_event(wait=1, full=True, auto_reconnect=True)
            publisher.note(ev.get("tag") if ev else None)
            try:
                data = publisher.next_set()
            except Exception as exc:  # pylint: disable=broad-except
                # At first start the syndic's key may not be written yet (seen on 3008).
                log.warning("tributary_keys: cannot publish accepted keys yet: %s", exc)
                publisher.retry_soon(RETRY_S)
                continue
            if data is not None:
                bus.fire_event(data, f"tributary/keys/{publisher.syndic_id}")
