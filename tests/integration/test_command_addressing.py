"""Addressing commands through the syndic: ``salt -G 'tributary:devices:<device>'`` from the
top master and ``salt-run tributary.command`` reach exactly the gateways that serve the device;
the other gateway's broker sees nothing. On Salt 3008.5 a publication reaches the gateways
through salt-syndic tens of seconds late (README "Versions tested", the reactor's bench), so
the grain form is sent ``--async`` and followed through its audit document (by job id)."""

from __future__ import annotations

import re
import time

import pytest

from tests.integration.test_commands import BNE, SYD, audited, devices  # noqa: F401
from tests.support.topology import wait_for

pytest.importorskip("paho.mqtt.client")
pytestmark = pytest.mark.usefixtures("topology")


def jid_doc(es, jid: str) -> list[dict]:
    res = es.search("tributary-commands-*", {"query": {"term": {"jid": jid}}})
    return [h["_source"] for h in res["hits"]["hits"]]


def test_grain_and_runner_forms_reach_exactly_the_gateways_serving_the_device(topology, devices):  # noqa: F811
    es, top = topology["es"], topology["top"]
    made, listeners = devices
    ret = top.salt_cli(timeout=60).run(
        "--async",
        "-G",
        "tributary.command",
        "boiler-1",
        "setpoint",
        66,
        minion_tgt="tributary:devices:boiler-1",
    )
    found = re.search(r"\b\d{20}\b", ret.stdout)
    assert found, ret
    docs = wait_for(lambda: jid_doc(es, found.group(0)), 150, "the grain-addressed command audited")
    assert [(d["gateway"], d["outcome"], d["device"]) for d in docs] == [(BNE, "acked", "boiler-1")]
    assert docs[0]["user"] and not docs[0]["user"].startswith("salt-call")
    run = top.salt_run_cli(timeout=400)
    timings = {}

    def runner(**kw):
        started = time.monotonic()
        ret = run.run("tributary.command", **kw)
        timings[kw["device"] + "@" + str(kw.get("site"))] = round(time.monotonic() - started, 1)
        assert ret.returncode == 0, ret
        return ret.data

    # boiler-? : boiler-1 (brisbane) and boiler-9 (sydney), not other tests' devices
    out = runner(device="boiler-?", command="setpoint", payload=61, site="brisbane")
    assert out["result"] is True and set(out["gateways"]) == {BNE}, out
    assert out["gateways"][BNE]["boiler-1"]["outcome"] == "acked"
    assert made["boiler-9"].seen == [] and made["pump-1"].seen == []
    assert listeners[SYD].topics == [], "the sydney gateway must have been sent nothing"
    out = runner(device="boiler-?", command="setpoint", payload=55)
    assert out["result"] is True, out
    assert {gw: sorted(d) for gw, d in out["gateways"].items()} == {
        BNE: ["boiler-1"],
        SYD: ["boiler-9"],
    }
    assert [m["payload"] for m in made["boiler-1"].seen] == [66, 61, 55]
    assert [m["payload"] for m in made["boiler-9"].seen] == [55]
    assert audited(es, SYD, out["gateways"][SYD]["boiler-9"])["outcome"] == "acked"
    assert [t for t in listeners[SYD].topics if "/pump-1/" in t] == []
    print("runner seconds per call:", timings)
