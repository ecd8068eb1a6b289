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
  answers, and each job's targeted minions (``salt/job/<jid>/new``, fired as
  ``syndic/<syndic id>/salt/job/<jid>/new`` as salt-syndic's forwarding puts them), so the
  top master's ``salt`` CLI and runners stop waiting once those answered instead of at their
  timeout.

With several top masters (``syndic_master`` a list of ``host:port``) each gets its own queue
and channel: every event goes to each, a job return only to the master its ``master_id`` names.
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
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def validate(config):
    """Validate the engine configuration; returns ``(bool, message)`` and never raises."""
    return uplink_lib.validate(config)


def _masters(cfg):
    """``(entry, opts)`` per top master, as salt-syndic connects to each: its ``id`` and
    ``pki_dir`` from the syndic's minion config, the master from ``syndic_master`` (one entry
    or a list of ``host`` / ``host:port``)."""
    import salt.config
    import salt.minion

    minion_conf = cfg.minion_config or os.path.join(
        os.path.dirname(__opts__["conf_file"]), "minion"
    )
    base = salt.config.syndic_config(__opts__["conf_file"], minion_conf)
    entries = cfg.master or base.get("syndic_master") or base["master"]
    for entry in [entries] if isinstance(entries, str) else list(entries):
        opts = dict(base)
        host, _, port = str(entry).rpartition(":")
        if host and port.isdigit():
            opts["master"], opts["master_port"] = host, int(port)
        else:
            opts["master"] = str(entry)
            if cfg.master_port:
                opts["master_port"] = cfg.master_port
        opts.update(salt.minion.resolve_dns(opts))
        yield str(entry), opts


def start(**config):
    """Forward until the master stops the engine."""
    ok, msg = validate(config)
    if not ok:
        log.error("%s: not starting", msg)
        raise ValueError(msg)
    import salt.channel.client

    def channel(opts):
        return salt.channel.client.ReqChannel.factory(opts, crypt="aes")

    cfg, _ = uplink_lib.parse_uplink(config)
    masters = list(_masters(cfg))
    several = len(masters) > 1
    links = [uplink_lib.Link(entry, opts, cfg, channel, several) for entry, opts in masters]
    for link in links:
        log.info("tributary_uplink: forwarding to %s as %s", link.uri, link.up.syndic_id)
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=True) as bus:
        while True:
            busy = any(link.up.pending() for link in links)
            ev = bus.get_event(wait=0.01 if busy else 0.2, full=True, auto_reconnect=True)
            while ev:
                for link in links:
                    link.up.take(ev.get("tag", ""), ev.get("data"))
                ev = bus.get_event(no_block=True, full=True, auto_reconnect=True)
            for link in links:
                link.report_drops()
                link.flush()
