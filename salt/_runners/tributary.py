"""
Tributary on the top master: where every reading is.

The logic lives in :mod:`saltext.tributary.relay.status`, :mod:`saltext.tributary.relay.ledger`
and :mod:`saltext.tributary.relay.repair`; this runner is their Salt face. It reads the relay
engine's configuration from this master's ``engines`` list and its spool (ledger, counters) from
disk, so it works while the engine runs.
"""

import logging
import os
import time

try:
    import saltext.tributary as tributary_pkg
    from saltext.tributary.analysis import detector as analysis_detector
    from saltext.tributary.analysis import health as analysis_health
    from saltext.tributary.analysis import store as analysis_store
    from saltext.tributary.analysis import views as analysis_views
    from saltext.tributary.control import commands as control_commands
    from saltext.tributary.reaction import alerts as reaction_alerts
    from saltext.tributary.reaction import views as reaction_views
    from saltext.tributary.reactor import notify as reactor_notify
    from saltext.tributary.relay import elasticsearch as es_lib
    from saltext.tributary.relay import repair as repair_lib
    from saltext.tributary.relay import status as relay_status

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
        return False, f"tributary runner: the saltext.tributary package is not installed: {MISSING}"
    return tributary_pkg.loadable(__virtualname__, __tributary_version__)


def status(check_es=True, detail=False, gateway=None, site=None, worst=10):
    """
    Where every reading is, fleet summary first: totals (gateways per state: ``silent``, no
    heartbeat or batch for ``health.overdue_factor`` x ``health.heartbeat_s``; ``gaps``, open
    gaps; ``ok``), open and given-up gaps, missing readings, the relay spool, the key sets
    published by syndics and their conflicts, the relay's counters; gateways per state and per
    site; the ``worst`` gateways (silent first, then most readings missing); and whether
    Elasticsearch is reachable with the engine's configuration (URL, credentials, CA):
    ``result`` is False when it is not.

    Per gateway detail comes under ``gateways`` with ``detail=True`` (every gateway) or for
    the gateways matching ``gateway`` and/or ``site`` (globs): epoch, last accounted sequence,
    lag (seconds since the last indexed batch), how far behind its heartbeat it is, open and
    given-up gaps, missing readings, replays requested, indexed, rejected and dead-lettered
    counts, relay spool depth and the gateway spool facts from its last heartbeat.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.status
        salt-run tributary.status check_es=False worst=25
        salt-run tributary.status gateway=gw-brisbane-1
        salt-run tributary.status site=brisbane
        salt-run tributary.status detail=True
    """
    return relay_status.status_from_opts(
        __opts__,
        check_es=bool(check_es),
        detail=_true(detail),
        gateway=str(gateway) if gateway else None,
        site=str(site) if site else None,
        worst=int(worst),
    )


def _true(value):
    """``True``/``true``/``1`` from the CLI or a Python caller."""
    return value is True or str(value).lower() in ("true", "1", "yes")


def retire_syndic(syndic_id, undo=False):
    """
    Stop trusting a syndic master as a key source: the gateway keys it vouched for stop
    verifying at once and its later key sets are refused (until ``undo=True``). Use it when a
    syndic host is decommissioned or compromised; its gateways can then be vouched for by the
    syndic they move to.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.retire_syndic syndic-3
        salt-run tributary.retire_syndic syndic-3 undo=True
    """
    return relay_status.retire_syndic(__opts__, str(syndic_id), undo=bool(undo))


def gaps(gateway=None, given_up=True, site=None, detail=False, oldest=10):
    """
    Sequence gaps the relay's ledger knows of. By default a fleet summary: open and given-up
    gaps, readings missing, gateways with open gaps, the same per site, and the ``oldest``
    open gaps. With ``detail=True``, or for the gateways matching ``gateway`` and/or ``site``
    (globs), the list of the gaps: gateway, site, epoch, from, to, how long open, replay
    attempts, state (open / given_up) and the reason a gap was given up (``given_up=False``
    lists the open ones only).

    CLI Example:

    .. code-block:: bash

        salt-run tributary.gaps
        salt-run tributary.gaps gateway=gw-brisbane-1 given_up=False
        salt-run tributary.gaps site=brisbane
        salt-run tributary.gaps detail=True
    """
    return relay_status.gaps_from_opts(
        __opts__,
        gateway=str(gateway) if gateway else None,
        given_up=_true(given_up),
        site=str(site) if site else None,
        detail=_true(detail),
        oldest=int(oldest),
    )


def replay(gateway, epoch=None, from_seq=None, to_seq=None, timeout=60, retry_given_up=False):
    """
    Ask a gateway (through its syndic) to re-emit readings. With ``epoch``, ``from_seq`` and
    ``to_seq``: that range. Without: every open gap the ledger holds for that gateway, now,
    regardless of grace period and backoff (a gap the gateway no longer holds is given up with
    the gateway's reason); with ``retry_given_up=True`` its given-up gaps are reopened and
    asked for too. Document ids are deterministic, so nothing is indexed twice.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.replay gw-brisbane-1
        salt-run tributary.replay gw-brisbane-1 retry_given_up=True
        salt-run tributary.replay gw-brisbane-1 3f9c2a1b7d10 1200 1300
    """
    call = repair_lib.local_client_replay(__opts__, timeout)
    if epoch is not None:
        if from_seq is None or to_seq is None:
            return {"result": False, "error": "give epoch, from_seq and to_seq, or none of them"}
        answer = call(gateway, str(epoch), from_seq, to_seq)
        outcome, detail = repair_lib.classify(answer)
        return {"result": outcome == "ok", "outcome": outcome, "detail": detail, "answer": answer}
    rcfg, spool = relay_status.open_status_spool(__opts__)
    if spool is None:
        return {"result": False, "error": "no relay spool on this master"}
    try:
        rep = repair_lib.GapRepairer(
            lambda: spool.ledger,
            call,
            backoff_s=rcfg.gaps.backoff_s,
            backoff_max_s=rcfg.gaps.backoff_max_s,
            max_readings=rcfg.gaps.max_readings,
            count=spool.count,
        )
        if retry_given_up:
            spool.ledger.reopen(gateway)
        spool.ledger.refresh()
        requested = [
            rep.request(spool.ledger, gap)
            for gap in spool.ledger.gaps(gateway, include_given_up=False)
        ]
    finally:
        spool.close()
    return {
        "result": all(d["outcome"] != "retry" for d in requested),
        "requests": requested,
    }


def anomalies(gateway=None, site=None, sensor=None, since="24h", size=100):
    """
    Anomalies the detector found, newest first, each with its explanation: value, expected
    value and band, deviation, the time context it was judged in ("Tue 10:00 (hour of
    week)"), samples seen, model state. Filters take globs.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.anomalies
        salt-run tributary.anomalies site=brisbane since=7d
        salt-run tributary.anomalies gateway='gw-brisbane-*' sensor=boiler-1 size=20
    """
    es_cfg = relay_status.engine_config(__opts__).get("elasticsearch")
    if not es_cfg:
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    rcfg = relay_status.resolved_config(__opts__)
    try:
        body = analysis_views.anomalies_query(
            int(time.time() * 1000), since, gateway, site, sensor, size
        )
    except ValueError as exc:
        return {"result": False, "error": str(exc)}
    client = es_lib.make_client(es_cfg)
    resp = client.search(
        index=f"{rcfg.index_prefix}-anomalies*",
        body=body,
        ignore_unavailable=True,
        allow_no_indices=True,
    )
    found = analysis_views.anomalies_from(resp)
    return {"result": True, "count": len(found), "anomalies": found}


def model(gateway, series):
    """
    What the detector's model of one series expects now, and why: expected value and band,
    the time context it comes from and how many samples it has seen, the model's state
    (learning / ok / quiet), the series' usual interval. ``series`` is ``sensor/metric``.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.model gw-brisbane-1 boiler-1/temperature
    """
    if not relay_status.engine_config(__opts__):
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    a = relay_status.resolved_config(__opts__).anomalies
    store = analysis_store.ModelStore(a.state_path)
    try:
        return analysis_views.model_view(
            store,
            str(gateway),
            str(series),
            int(time.time() * 1000),
            analysis_detector.DetectorConfig(
                threshold=a.threshold, learn_n=a.learn_n, quiet_n=a.quiet_n
            ),
        )
    finally:
        store.close()


def health(check_es=True, detail=False, site=None, oldest=10):
    """
    Fleet health in three layers, per site: device (gateways silent, backlog growing,
    dropping readings, broker disconnected, clock skew; sensors silent or stuck), population
    (site outages, sensors departing from their siblings) and application (anomalies in the
    last hour). By default counts only: per site the gateways and how many report, the
    state (ok / degraded / outage) and the open findings per layer and kind; fleet totals; the
    ``oldest`` open findings. With ``detail=True``, or for the sites matching ``site`` (a
    glob), each site lists its open findings (``device``, ``population``) with how long each
    has been open. ``check_es=False`` skips the anomaly counts (no Elasticsearch query).

    CLI Example:

    .. code-block:: bash

        salt-run tributary.health
        salt-run tributary.health check_es=False
        salt-run tributary.health site=brisbane
        salt-run tributary.health detail=True
    """
    if not relay_status.engine_config(__opts__):
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    rcfg, spool = relay_status.open_status_spool(__opts__)
    facts = {}
    if spool is not None:
        try:
            facts = relay_status.heartbeat_facts(spool)
        finally:
            spool.close()
    book = analysis_health.FindingBook(rcfg.anomalies.state_path)
    try:
        findings = book.open()
    finally:
        book.close()
    now = int(time.time() * 1000)
    by_site = {}
    if check_es:
        try:
            client = es_lib.make_client(relay_status.engine_config(__opts__)["elasticsearch"])
            resp = client.search(
                index=f"{rcfg.index_prefix}-anomalies*",
                body=analysis_views.anomalies_by_site_query(now),
                ignore_unavailable=True,
                allow_no_indices=True,
            )
            by_site = {b["key"]: b["doc_count"] for b in resp["aggregations"]["sites"]["buckets"]}
        except Exception as exc:  # pylint: disable=broad-except
            log.warning("tributary.health: anomaly counts unavailable: %s", exc)
    return analysis_views.health_view(
        findings,
        facts,
        by_site,
        now,
        rcfg.health.heartbeat_s,
        rcfg.health.overdue_factor,
        detail=_true(detail),
        site=str(site) if site else None,
        oldest=int(oldest),
    )


def alerts(site=None, recent=20):
    """
    Alerts raised by the relay engine's rules: firing, flapping and pending ones by site (how
    long, which value), the most recent transitions, and the active silences.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.alerts
        salt-run tributary.alerts site=brisbane recent=50
    """
    if not relay_status.engine_config(__opts__):
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    book = reaction_alerts.AlertBook(relay_status.resolved_config(__opts__).alerts_path)
    try:
        return reaction_views.alerts_view(book, int(time.time() * 1000), site, int(recent))
    finally:
        book.close()


def silence(rule="*", gateway="*", duration="1h", comment=""):
    """
    Silence alerts for a time: their transitions are still recorded and indexed, but no Salt
    event is fired (the reactor does not act). ``rule`` and ``gateway`` are globs;
    ``duration`` is like ``30m``, ``4h`` or ``2d``.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.silence rule=boiler-hot gateway='gw-brisbane-*' duration=4h
    """
    if not relay_status.engine_config(__opts__):
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    try:
        span = analysis_views.span_ms(duration)
    except ValueError as exc:
        return {"result": False, "error": str(exc).replace("since:", "duration:")}
    now = int(time.time() * 1000)
    book = reaction_alerts.AlertBook(relay_status.resolved_config(__opts__).alerts_path)
    try:
        sid = book.silence(str(rule), str(gateway), now + span, str(comment))
        return {"result": True, "id": sid, "rule": rule, "gateway": gateway, "until_ms": now + span}
    finally:
        book.close()


def notify(topic, message, **kwargs):
    """
    Publish ``message`` (JSON) on ``topic`` of the upstream broker in this master's
    ``tributary_reactor:notify`` config (QoS from there, default 1), waiting (bounded) until
    the broker has it. The reactor's ``notify`` action calls this with the alert's fields; the
    topic is a template of the action table, filled with the alert's checked names.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.notify topic=tributary/alerts/brisbane/boiler-hot/firing \
            message='{"rule": "boiler-hot", "state": "firing", "value": 85}'
    """
    cfg, error = reactor_notify.notify_config(__opts__)
    if cfg is None:
        return {"result": False, "error": error}
    return reactor_notify.publish(cfg, topic, message)


def report(site=None, since="24h", out=None):
    """
    Write the fleet report: one self-contained HTML file (opens offline: styles and charts
    inline, no script, no external URL) and beside it a PNG per chart, for mail and chat.
    Fleet overview (sites x gateways: last seen, health state, spool backlog, lag, gaps;
    pipeline totals), per site every sensor series as a min/mean/max band against its
    siblings with anomalies (and the detector's expected band) and alerts marked, health
    findings over time by layer, and the pipeline (readings in and indexed, lag, dead
    letters, replays, gaps, commands). Built from Elasticsearch aggregations only.
    ``site`` takes a glob; ``since`` is like ``24h`` or ``7d``; ``out`` defaults to
    ``<cachedir>/tributary/report/report.html``.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.report
        salt-run tributary.report site=brisbane since=7d out=/srv/www/fleet/report.html
    """
    # imported here: matplotlib takes about a second to import, which every other
    # ``salt-run tributary.*`` call would otherwise pay when the loader imports this module
    import saltext.tributary.report as report_lib
    from saltext.tributary.report import model as report_model
    from saltext.tributary.report import queries as report_queries
    from saltext.tributary.report import render as report_render

    es_cfg = relay_status.engine_config(__opts__).get("elasticsearch")
    if not es_cfg:
        return {"result": False, "error": "no tributary_relay engine configured on this master"}
    if not report_render.HAS_MATPLOTLIB:
        return {"result": False, "error": report_render.MISSING}
    rcfg = relay_status.resolved_config(__opts__)
    out = out or os.path.join(__opts__["cachedir"], "tributary", "report", "report.html")
    st = relay_status.status_from_opts(__opts__, check_es=False)
    book = analysis_health.FindingBook(rcfg.anomalies.state_path)
    try:
        findings = book.open()
    finally:
        book.close()
    local = {
        "gateways": st.get("gateways") or {},
        "fleet": st.get("fleet") or {},
        "findings": findings,
        "heartbeat_s": rcfg.health.heartbeat_s,
        "overdue_factor": rcfg.health.overdue_factor,
    }
    started = time.monotonic()
    try:
        rep = report_lib.build(
            report_queries.client_search(es_lib.make_client(es_cfg)),
            rcfg.index_prefix,
            int(time.time() * 1000),
            since,
            str(site) if site else None,
            local,
        )
    except ValueError as exc:
        return {"result": False, "error": str(exc)}
    except Exception as exc:  # pylint: disable=broad-except
        return {"result": False, "error": relay_status.describe_error(exc)}
    query_s = round(time.monotonic() - started, 2)
    try:
        # rendered in a Python process of its own (matplotlib and numpy out of salt-run's)
        written = report_lib.write_isolated(rep, str(out))
    except Exception as exc:  # pylint: disable=broad-except
        log.error("tributary.report: rendering failed: %s", exc)
        return {"result": False, "error": f"rendering failed: {exc}"}
    return {
        "result": True,
        **written,
        "query_s": query_s,
        "series": sum(len(c.series) for c in rep.sites),
        "sites": sorted({c.site for c in rep.sites}),
        "interval": report_model.interval_text(rep.window.interval_ms),
    }


def command(
    device,
    command,
    payload=None,
    site=None,
    timeout=None,
    test=False,
    job_timeout=None,
    resolve_timeout=90,
    resolve_settle=3,
):
    """
    Send ``command`` to every device matching ``device`` (a glob), through the gateways that
    serve them (the ``tributary:devices`` grain), optionally only in ``site``: resolves the
    gateways with ``grains.get tributary:devices`` on ``G@tributary:devices:<device>`` (and
    ``G@site:<site>``), then runs ``tributary.command`` for each matching device on exactly
    the gateways that serve it, through the syndics, until they answered (at most
    ``job_timeout``, default ``timeout`` + 60 s). Behind a syndic the top master cannot know
    which minions a grain target reaches: the resolution ends ``resolve_settle`` seconds after
    the last answer (at most ``resolve_timeout``). Each gateway checks its own allow-list and
    rate limit and audits the command (``tributary-commands-*``). Returns, per gateway and
    device, the outcome (``acked``, ``refused_by_device``, ``refused``, ``timeout``,
    ``test``, ``error``, or ``no_return``) with the reason, the device's answer and the
    latency; ``result`` is True when every device acknowledged. ``test=True`` asks each
    gateway what it would send, and nothing is published.

    CLI Example:

    .. code-block:: bash

        salt-run tributary.command site=brisbane device='boiler-*' command=setpoint payload=70
        salt-run tributary.command device=valve-3 command=close test=True
    """
    import salt.client

    client = salt.client.get_local_client(mopts=dict(__opts__))
    wait = float(job_timeout) if job_timeout else float(timeout or 10) + 60.0
    settle = float(resolve_settle)

    def cmd(tgt, fun, arg, kwarg, tgt_type, timeout_s, expect):
        got = {}
        last = None
        for ret in client.cmd_iter_no_block(
            tgt, fun, arg=arg, kwarg=kwarg or None, tgt_type=tgt_type, timeout=int(timeout_s)
        ):
            for minion, data in (ret or {}).items():
                if isinstance(data, dict) and "ret" in data:
                    got[minion] = data["ret"]
                    last = time.monotonic()
            if expect and expect <= set(got):
                break
            if not expect and last is not None and time.monotonic() - last > settle:
                break
        return got

    try:
        return control_commands.send(
            cmd,
            str(device),
            str(command),
            payload,
            str(site) if site else None,
            timeout,
            test is True or str(test).lower() == "true",
            wait,
            float(resolve_timeout),
        )
    finally:
        client.destroy()
