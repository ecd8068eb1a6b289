"""
Tributary uplink (syndic masters on Salt 3008): carry Tributary's events and job returns to the
top master where salt-syndic cannot.

Salt 3008.5's salt-syndic forwards no events and, after the first, no job returns (README,
"Versions tested", has the upstream bug and its reproduction). This engine runs on each syndic
master beside ``tributary_keys``, reads the syndic master's event bus and sends to the top
master, over a request channel of its own authenticated as the syndic (the ``id`` and
``pki_dir`` salt-syndic uses, from the syndic's minion config), what salt-syndic would have
forwarded for Tributary:

- gateway batches and heartbeats (``salt/beacon/<gateway>/tributary_*/...``) and the signed key
  sets (``tributary/keys/<syndic>``), fired on the top master's bus under the same tags;
- with ``returns: true``, every job return (``salt/job/<jid>/ret/<minion>``), so the relay's
  replay requests and commands targeted from the top master (``salt -G site:x ...``) get their
  answers.

Events wait in a bounded in-memory queue while the top master is unreachable (retried with
capped exponential backoff); past ``max_queue`` the oldest are dropped, counted and logged, and
the relay's gap repair asks the gateways for what was lost. Do not run it where salt-syndic
forwards events (Salt 3006, 3007): the relay would fold every batch twice.

Configuration (syndic master config)::

    engines:
      - tributary_uplink:
          returns: true              # forward job returns too
          max_queue: 20000           # events (and jobs) held while the top master is away
          batch: 200                 # events per request
          timeout_s: 30              # per request
          backoff: {min_s: 0.5, max_s: 30}
          # minion_config: /etc/salt/minion   (the syndic's id and pki_dir; default: the
          #                                     minion file beside this master's config)
          # master: top.example.net          (default: syndic_master)
          # master_port: 4506                (default: syndic_master_port)
"""

import logging
import os
import time

try:
    import saltext.tributary as tributary_pkg
    from saltext.tributary.syndic import uplink as uplink_lib

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)


log = logging.getLogger(__name__)
__virtualname__ = "tributary_uplink"
__tributary_version__ = "0.1.0"


def __virtual__():
    if not HAS_LIBS:
        return False, f"tributary_uplink: saltext.tributary is not installed: {MISSING}"
    mismatch = tributary_pkg.version_mismatch(__virtualname__, __tributary_version__)
    if mismatch:
        return False, mismatch
    return __virtualname__


def validate(config):
    """Validate the engine configuration; returns ``(bool, message)`` and never raises."""
    return uplink_lib.validate(config)


def _syndic_opts(cfg):
    """The opts salt-syndic itself connects to the top master with."""
    import salt.config
    import salt.minion

    minion_conf = cfg.minion_config or os.path.join(
        os.path.dirname(__opts__["conf_file"]), "minion"
    )
    opts = salt.config.syndic_config(__opts__["conf_file"], minion_conf)
    if cfg.master:
        opts["master"] = cfg.master
    if cfg.master_port:
        opts["master_port"] = cfg.master_port
    opts.update(salt.minion.resolve_dns(opts))
    return opts


def start(**config):
    """Forward until the master stops the engine."""
    ok, msg = validate(config)
    if not ok:
        log.error("%s: not starting", msg)
        raise ValueError(msg)
    import salt.channel.client

    cfg, _ = uplink_lib.parse_uplink(config)
    opts = _syndic_opts(cfg)
    up = uplink_lib.Uplink(
        opts["id"], max_queue=cfg.max_queue, batch=cfg.batch, returns=cfg.returns
    )
    backoff = cfg.backoff
    delay, next_try, channel = 0.0, 0.0, None
    log.info("tributary_uplink: forwarding to %s as %s", opts.get("master_uri"), opts["id"])
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=True) as bus:
        while True:
            ev = bus.get_event(
                wait=0.2 if not up.pending() else 0.01, full=True, auto_reconnect=True
            )
            while ev:
                up.take(ev.get("tag", ""), ev.get("data"))
                ev = bus.get_event(no_block=True, full=True, auto_reconnect=True)
            dropped = up.counters.pop("events_dropped", 0) + up.counters.pop("returns_dropped", 0)
            if dropped:
                log.error(
                    "tributary_uplink: queue past max_queue (%s): dropped the %s oldest items;"
                    " the relay's gap repair asks the gateways for lost batches",
                    cfg.max_queue,
                    dropped,
                )
            while up.pending() and time.monotonic() >= next_try:
                kind, load, size = up.next_request()
                try:
                    if channel is None:
                        channel = salt.channel.client.ReqChannel.factory(opts, crypt="aes")
                    channel.send(load, timeout=cfg.timeout_s, tries=1)
                except Exception as exc:  # pylint: disable=broad-except
                    delay = min(max(delay * 2, backoff.min_s), backoff.max_s)
                    next_try = time.monotonic() + delay
                    log.warning(
                        "tributary_uplink: %s to %s failed (%s); retrying in %.1f s",
                        kind,
                        opts.get("master_uri"),
                        exc,
                        delay,
                    )
                    if channel is not None:
                        channel.close()
                        channel = None
                    break
                up.sent(kind, size)
                delay = 0.0
