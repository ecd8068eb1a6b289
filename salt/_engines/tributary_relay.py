"""
Tributary relay engine (top master): event bus -> durable relay spool -> Elasticsearch.

Every Tributary batch event (``salt/beacon/<gateway>/<beacon>/batch``, also when a syndic
forwards it a second time as ``syndic/<syndic>/salt/beacon/...``) is appended to the relay spool
at once; a shipper thread bulk-creates one document per reading with the id
``<gateway>:<epoch>:<seq>`` and removes a batch from the spool only when Elasticsearch has
confirmed every document (created, already present, or dead-lettered).

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
          index_prefix: tributary
          indices: daily
          bulk:
            max_docs: 5000
            max_wait_s: 0.2
          # spool_path: /var/cache/salt/master/tributary/relay.db
"""

import logging

try:
    import elasticsearch  # noqa: F401

    from saltext.tributary import es as es_lib
    from saltext.tributary import relay as relay_lib

    HAS_LIBS = True
    MISSING = ""
except ImportError as _exc:
    HAS_LIBS = False
    MISSING = str(_exc)

import salt.utils.event

log = logging.getLogger(__name__)
__virtualname__ = "tributary_relay"


def __virtual__():
    if not HAS_LIBS:
        return (
            False,
            "tributary_relay: saltext.tributary[master] (elasticsearch) is not installed: "
            + MISSING,
        )
    return __virtualname__


def validate(config):
    """Validate the engine configuration; returns ``(bool, message)`` and never raises."""
    return relay_lib.validate_relay(config)


def start(**config):
    """Run the relay until the master stops it."""
    ok, msg = validate(config)
    if not ok:
        log.error("%s: not starting", msg)
        raise ValueError(msg)
    es_cfg = config["elasticsearch"]
    client = es_lib.make_client(es_cfg)
    rcfg = relay_lib.relay_config(config, __opts__["cachedir"])

    def setup():
        es_lib.install_templates(
            client, rcfg.prefix, replicas=es_cfg.get("replicas", 1), shards=es_cfg.get("shards", 1)
        )

    relay = relay_lib.Relay(client, rcfg, setup=setup)
    # Fail loudly at start on a wrong password, CA or URL; events are still spooled meanwhile
    # and the shipper retries the set-up with backoff.
    try:
        setup()
        relay.ready = True
    except Exception as exc:  # pylint: disable=broad-except
        log.critical("tributary relay: Elasticsearch is not usable at start: %s", exc)
    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=True) as bus:
        log.info("tributary relay: started, spool %s", rcfg.spool_path)
        relay_lib.run(lambda: bus.get_event(wait=1, full=True, auto_reconnect=True), relay)
