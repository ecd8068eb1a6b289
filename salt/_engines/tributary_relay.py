"""
Tributary relay engine (top master): event bus -> durable relay spool -> Elasticsearch.

Every Tributary batch event (``salt/beacon/<gateway>/<beacon>/batch``, also when a syndic
forwards it a second time as ``syndic/<syndic>/salt/beacon/...``) is appended to the relay spool
at once; a shipper thread bulk-creates one document per reading with the id
``<gateway>:<epoch>:<seq>`` and removes a batch from the spool only when Elasticsearch has
confirmed every document (created, already present, or dead-lettered).

Origin: every batch and heartbeat must carry a valid signature by its gateway's own minion key
(see ``saltext.tributary.protocol.signing``). A gateway attached to this master is verified
against the key this master accepted for it; a gateway behind a syndic against the key its
syndic vouched for in a signed key set (``tributary_keys`` engine), taken only from the syndic
ids in ``trusted_syndics``, one source per gateway (see ``saltext.tributary.relay.keyring``).
Unsigned, mis-signed or unknown-key batches go to the dead-letter index with the reason
(``allow_unsigned: true`` lets unsigned ones through during a migration).

A gap-repair thread (``saltext.tributary.relay.repair``) asks gateways to replay what the ledger
shows missing: ``tributary.replay`` jobs published through LocalClient without waiting (they
work through syndics), their answers taken from this engine's own bus subscription.

Scale-out (``scaleout``, see ``saltext.tributary.relay.scaleout`` and README "Scale-out"): the
relay can also run on each syndic master (``role: syndic``), indexing its own gateways
(verified against that master's accepted keys) and sending signed receipts of the confirmed
sequence ranges up; the top master's relay (``role: top``) then skips the gateways of live
syndic relays, records their receipts in its ledger (gap repair stays on the top) and indexes
a syndic relay's gateways itself while that relay is silent for ``takeover_s``.

Configuration (master config)::

    engines:
      - tributary_relay:
          elasticsearch:
            hosts: ["https://es.example.net:9200"]
            username: tributary
            password: secret
            # api_key: "base64 id:key"      (instead of username/password)
            ca_certs: /etc/salt/pki/es-ca.crt
            replicas: 1
            # refresh_interval: 1s  # default: ES's own (none while nobody searches)
          index_prefix: tributary
          indices: daily            # daily | single | data_stream (needs a full ES distribution)
          bulk:
            max_docs: 5000
            max_wait_s: 0.2
            concurrency: 2          # bulks in flight while the next one is built
            max_bytes: 10485760     # body bytes per bulk; a 413 splits it
            max_attempts: 30        # tries of a document answered 429/5xx, then dead-lettered
          backoff: {min_s: 0.5, max_s: 30}
          # spool_path: /var/cache/salt/master/tributary/relay.db
          spool_max_bytes: 2147483648   # past it: oldest batches dropped, counted, logged
          allow_unsigned: false
          trusted_syndics: [syndic-1]  # syndic ids whose key sets vouch for their gateways
          keyset_ttl_s: 600          # a syndic's keys stop verifying new rows this long after
                                     # its last key set
          key_wait_s: 120            # how long a batch waits for its gateway's key set
          metrics_interval_s: 30     # pipeline self-metrics into <prefix>-metrics-*
          max_future_s: 86400        # readings stamped further ahead: dead-lettered
          max_age_s: 3024000         # readings older than this: dead-lettered, no index made
          gaps:
            enabled: true
            grace_s: 60              # a gap open this long is requested
            check_s: 5
            backoff_s: 30            # per gap, doubled per request, capped by backoff_max_s
            backoff_max_s: 600
            per_minute: 6            # replay requests, fleet-wide
            max_attempts: 8          # answered replays before a gap still open is given up
            give_up_after_s: 604800  # an unanswered gap is retried this long (gateway retention)
            concurrency: 8           # replay requests in flight, one per gateway
            keep_s: 2592000          # settled epochs and given-up gaps are pruned after this
            max_readings: 20000      # per request
            timeout_s: 60
          anomalies:                 # the detector on confirmed readings (README: Anomalies)
            enabled: true
            threshold: 0.1345        # score of an anomaly (tuned on NAB)
            learn_n: 150             # points before a series is scored
            point_interval_s: 0.1    # a series' readings closer than this: one point, their mean
            quiet_n: 100             # points without a new alert after one
            rearm_n: 20              # ... unless this many calm points came first (0: never)
            max_series: 100000       # models kept; the least recently seen are evicted
            queue_batches: 256       # confirmed bulks queued for it; past that: shed, counted
            persist_s: 60            # models saved this often (and at stop)
            # state_path: /var/cache/salt/master/tributary/analysis.db
          health:                    # findings in three layers (README: Health)
            enabled: true
            heartbeat_s: 30          # the gateways' tributary_health interval
            overdue_factor: 3        # heartbeats missed before a gateway is silent
            silent_factor: 5         # usual intervals before a sensor is silent
            min_silent_s: 60
            stuck_n: 30              # the same value this many times: stuck
            skew_s: 120              # a gateway clock further off: clock skew
            backlog_n: 3             # heartbeats with a growing spool backlog
            outage_min: 2            # silent gateways of one site make a site outage
            depart_k: 6              # MADs from its siblings: a sensor departs
            check_s: 15
          scaleout:                  # README: Scale-out
            role: single             # single | top | syndic
            takeover_s: 60           # (top) a syndic relay silent this long: taken over
            receipt_s: 5             # (syndic) confirmed ranges go up this often
            full_receipt_s: 300      # (syndic) all ranges of recent epochs again
            full_window_s: 86400     # (syndic) ... active within this long
          # rules: alert rules (README: Alerts), for example
          #   - name: boiler-hot
          #     match: {site: brisbane, sensor: 'boiler-*', metric: temperature}
          #     when: {above: 80, for_s: 60, clear_below: 75}
          #     severity: critical
          # alerts_path: /var/cache/salt/master/tributary/alerts.db

Scale-out, the top master's relay (the rest as above)::

    engines:
      - tributary_relay:
          elasticsearch: {hosts: ["https://es.example.net:9200"], username: tributary,
                          password: secret, ca_certs: /etc/salt/pki/es-ca.crt}
          trusted_syndics: [syndic-1, syndic-2, syndic-3]
          scaleout:
            role: top
            syndic_relays: [syndic-1, syndic-2]   # each must be in trusted_syndics; syndic-3's
                                                  # gateways are still indexed here
            takeover_s: 60

and on syndic master syndic-1 (beside ``tributary_keys``; gap repair runs on the top)::

    engines:
      - tributary_relay:
          elasticsearch: {hosts: ["https://es.example.net:9200"], username: tributary,
                          password: secret, ca_certs: /etc/salt/pki/es-ca.crt}
          anomalies: {enabled: false}   # detector, health and rules run where readings are
          health: {enabled: false}      # indexed: here, or off (README: Scale-out)
          scaleout:
            role: syndic
            syndic_id: syndic-1         # as the top master knows it (its trusted_syndics)
            # signing_key: /etc/salt/pki/minion/minion.pem   (as tributary_keys)
            receipt_s: 5
"""

import gc
import logging

try:
    import elasticsearch  # noqa: F401

    import saltext.tributary as tributary_pkg
    from saltext.tributary import consumers
    from saltext.tributary.reaction import rules as reaction_rules
    from saltext.tributary.relay import config as relay_config
    from saltext.tributary.relay import elasticsearch as es_lib
    from saltext.tributary.relay import pipeline, scaleout
    from saltext.tributary.relay import repair as repair_lib
    from saltext.tributary.relay import spool as relay_spool
    from saltext.tributary.relay import status as relay_status

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)

import salt.utils.event

log = logging.getLogger(__name__)
__virtualname__ = "tributary_relay"
__tributary_version__ = "0.1.0"


def __virtual__():
    if not HAS_LIBS:
        return (
            False,
            "tributary_relay: saltext.tributary[master] (elasticsearch) is not installed: "
            + MISSING,
        )
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def validate(config):
    """Validate the engine configuration; returns ``(bool, message)`` and never raises."""
    ok, msg = relay_config.validate_relay(config)
    if ok and isinstance(config, dict):
        return reaction_rules.validate_rules(config.get("rules"))
    return ok, msg


def start(**config):
    """Run the relay until the master stops it."""
    ok, msg = validate(config)
    if not ok:
        log.error("%s: not starting", msg)
        raise ValueError(msg)
    es_cfg = config["elasticsearch"]
    rcfg = relay_config.relay_config(config, __opts__["cachedir"], __opts__.get("pki_dir"))
    client = es_lib.make_client(rcfg.elasticsearch)

    def setup():
        es_lib.install_templates(
            client,
            rcfg.index_prefix,
            replicas=rcfg.elasticsearch.replicas,
            shards=rcfg.elasticsearch.shards,
            refresh_interval=rcfg.elasticsearch.refresh_interval,
            data_streams=rcfg.indices == "data_stream",
        )
        if rcfg.indices != "data_stream":
            es_lib.precreate_indices(client, rcfg.index_prefix, rcfg.daily)

    relay = pipeline.Relay(client, rcfg, setup=setup)
    relay.name = __opts__.get("id") or "relay"
    subscribers = _subscribers(relay, es_cfg, rcfg)
    # Fail loudly at start on a wrong password, CA or URL; events are still spooled meanwhile
    # and the shipper retries the set-up with backoff.
    try:
        setup()
        relay.ready = True
    except Exception as exc:  # pylint: disable=broad-except
        log.critical(
            "tributary relay: Elasticsearch %s is not usable at start (wrong URL, CA or"
            " credentials?): %s",
            es_cfg.get("hosts"),
            relay_status.describe_error(exc),
        )
    receipts = _scaleout(relay, rcfg)
    repairer = replays = None
    if rcfg.gaps.enabled and rcfg.scaleout.role != "syndic":  # the top repairs for the fleet
        replays = repair_lib.salt_job_replayer(__opts__, rcfg.gaps.timeout_s)
        repairer = repair_lib.GapRepairer(
            lambda: relay_spool.RelaySpool(rcfg.spool_path).ledger,
            replays,
            grace_s=rcfg.gaps.grace_s,
            check_s=rcfg.gaps.check_s,
            backoff_s=rcfg.gaps.backoff_s,
            backoff_max_s=rcfg.gaps.backoff_max_s,
            per_minute=rcfg.gaps.per_minute,
            max_attempts=rcfg.gaps.max_attempts,
            max_readings=rcfg.gaps.max_readings,
            concurrency=rcfg.gaps.concurrency,
            give_up_after_s=rcfg.gaps.give_up_after_s,
            keep_s=rcfg.gaps.keep_s,
            count=relay.count,
        )
        repairer.start()
    try:
        _serve(relay, replays)
    finally:
        if repairer is not None:
            repairer.stop()
        if receipts is not None:
            receipts.stop()
        for sub in subscribers:
            sub.close()


def _scaleout(relay, rcfg):
    """Scale-out: a top relay skips what live syndic relays own and takes their receipts; a
    syndic relay sends its receipts up (returns their thread, to stop)."""
    if rcfg.scaleout.role == "top":
        scaleout.attach_top(relay)
        return None
    if rcfg.scaleout.role != "syndic":
        return None
    key = scaleout.default_signing_key(__opts__["pki_dir"], rcfg.scaleout.signing_key)
    bus = salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=False)
    loop = scaleout.ReceiptLoop(rcfg.spool_path, rcfg.scaleout, key, bus.fire_event)
    loop.start()
    log.info("tributary relay: syndic relay %s, receipts signed with %s", loop.cfg.syndic_id, key)
    return loop


def _subscribers(relay, es_cfg, rcfg):
    """Run the detector, the health layers and the alert rules on the relay's confirmed
    readings, in a child process of their own (``saltext.tributary.consumers``); returns
    what to close at stop."""
    if not consumers.wanted(rcfg):
        return []
    opts = {k: v for k, v in __opts__.items() if not callable(v)}
    return [
        relay.subscribe_process(consumers.build, (opts, es_cfg, rcfg), rcfg.anomalies.queue_batches)
    ]


def _serve(relay, replays=None):
    """Drain the master bus with an event handler on the engine's own IOLoop.

    ``get_event()`` would run every read through a SyncWrapper thread (Salt 3007): py-spy put
    over half of the engine's intake time in starting and joining those threads."""
    try:
        from salt.ext.tornado.ioloop import IOLoop  # Salt 3006 vendors tornado 4

        io_loop = IOLoop()
        io_loop.make_current()  # tornado 4 coroutines use the current loop
    except ImportError:
        from tornado.ioloop import IOLoop  # Salt 3007+ (tornado 6 on asyncio)

        io_loop = IOLoop()
    bus = salt.utils.event.get_master_event(
        __opts__, __opts__["sock_dir"], listen=True, io_loop=io_loop
    )

    async def handle(raw):
        tag, data = bus.unpack(raw)
        if replays is not None and isinstance(tag, str) and replays.take(tag, data):
            return  # a gateway's answer to a replay request
        pipeline.take_event(relay, tag, data)

    bus.subscribe("")
    bus.set_event_handler(handle)
    # What is alive now (Salt's loader, its modules, the engine's set-up) lives as long as the
    # engine: frozen, the collector's full passes during a burst no longer walk all of it
    gc.freeze()
    relay.start()
    log.info("tributary relay: started, spool %s", relay.config.spool_path)
    try:
        io_loop.start()
    finally:
        relay.stop()
        bus.destroy()
