"""
Tributary key publisher (syndic masters): tell the top master which gateway keys are accepted.

The relay on the top master verifies each batch's signature against its gateway's *accepted*
public key, but behind a syndic those keys live on the syndic master. This engine reads the
syndic master's accepted keys (``<pki_dir>/minions``) and fires ``tributary/keys/<syndic id>``
with all of them, signed with the syndic's own key (the one the top master accepted for the
syndic), so no gateway can forge a key set. salt-syndic forwards the event to the top master.
It publishes at start, every ``interval`` seconds, and at once when this master's keys change
(``salt/key`` events: accept, reject, delete), so a deleted key stops verifying quickly.

Configuration (syndic master config)::

    engines:
      - tributary_keys:
          interval: 60                               # seconds between full publications
          # syndic_id: syndic-1                      (default: the syndic's minion id)
          # signing_key: /etc/salt/pki/minion/minion.pem   (the key salt-syndic authenticates
          #                                                 with; default: <pki_dir>/minion.pem,
          #                                                 then /etc/salt/pki/minion/minion.pem)
"""

import logging
import os
import time

try:
    import saltext.tributary as tributary_pkg
    from saltext.tributary.protocol import signing

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
    try:
        interval = config.get("interval", 60)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            return False, "tributary_keys: interval must be a positive number of seconds"
        for key in ("syndic_id", "signing_key"):
            if key in config and not isinstance(config[key], str):
                return False, f"tributary_keys: {key} must be a string"
        return True, "valid"
    except Exception as exc:  # pylint: disable=broad-except
        return False, f"tributary_keys: invalid configuration: {exc}"


def _signing_key(config):
    if config.get("signing_key"):
        return config["signing_key"]
    for path in (
        os.path.join(__opts__["pki_dir"], "minion.pem"),
        "/etc/salt/pki/minion/minion.pem",
    ):
        if os.path.exists(path):
            return path
    return os.path.join(__opts__["pki_dir"], "minion.pem")


def start(**config):
    """Publish this master's accepted keys upward until the master stops."""
    ok, msg = validate(config)
    if not ok:
        log.error("%s: not starting", msg)
        raise ValueError(msg)
    interval = float(config.get("interval", 60))
    syndic_id = config.get("syndic_id") or __opts__.get("id")
    key_path = _signing_key(config)
    last = 0.0
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=True) as bus:
        while True:
            ev = bus.get_event(wait=1, full=True, auto_reconnect=True)
            changed = bool(ev and str(ev.get("tag", "")).startswith("salt/key"))
            if not changed and time.monotonic() - last < interval:
                continue
            last = time.monotonic()
            try:
                keys = signing.read_accepted_keys(__opts__["pki_dir"])
                data = signing.sign_keyset(syndic_id, keys, key_path)
            except Exception as exc:  # pylint: disable=broad-except
                # At first start the syndic's key may not be written yet (seen on 3008):
                # try again in RETRY_S rather than a whole interval later.
                log.warning("tributary_keys: cannot publish accepted keys yet: %s", exc)
                last = time.monotonic() - interval + min(RETRY_S, interval)
                continue
            bus.fire_event(data, f"tributary/keys/{syndic_id}")
