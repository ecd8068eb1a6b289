"""The uplink's pure part: which syndic-master events go up, bounded queues, requests."""

from __future__ import annotations

from saltext.tributary.syndic.uplink import Uplink, UplinkConfig, parse_uplink, validate

BATCH = "salt/beacon/gw-1/tributary_mqtt/batch"


def ret(jid: str, minion: str, value: object = True) -> tuple[str, dict]:
    return f"salt/job/{jid}/ret/{minion}", {
        "jid": jid,
        "id": minion,
        "fun": "test.ping",
        "return": value,
        "retcode": 0,
        "success": True,
        "cmd": "_return",
        "_stamp": "2026-11-30T00:00:00",
    }


def test_only_tributary_events_and_job_returns_go_up():
    up = Uplink("syn-1")
    assert up.take(BATCH, {"v": 1})
    assert up.take("salt/beacon/gw-1/tributary_health/health", {"v": 1})
    assert up.take("tributary/keys/syn-1", {"keys": {}})
    assert up.take(*ret("20261130000000000001", "gw-1"))
    for tag in (
        "salt/beacon/gw-1/inotify/x",
        "salt/job/20261130000000000001/new",
        "salt/auth",
        "salt/key",
        "tributary/keys/a/b",
        "salt/job/notajid/ret/gw-1",
    ):
        assert not up.take(tag, {"jid": "1", "return": 1}), tag
    assert not up.take(BATCH, "not a mapping")
    assert not up.take(None, {})  # type: ignore[arg-type]
    assert len(up.events) == 3 and len(up.rets) == 1


def test_returns_are_grouped_per_job_and_sent_before_events():
    up = Uplink("syn-1", batch=10)
    up.take(BATCH, {"v": 1})
    up.take(*ret("1", "gw-1", "a"))
    up.take(*ret("1", "gw-2", "b"))
    up.take(*ret("2", "gw-1", "c"))
    kind, load, size = up.next_request()
    assert kind == "returns" and size == 2
    assert load["cmd"] == "_syndic_return" and load["id"] == "syn-1"
    first = load["load"][0]
    assert first["jid"] == "1" and first["fun"] == "test.ping" and first["id"] == "syn-1"
    assert first["return"] == {
        "gw-1": {"return": "a", "retcode": 0, "success": True},
        "gw-2": {"return": "b", "retcode": 0, "success": True},
    }
    up.sent(kind, size)
    kind, load, size = up.next_request()
    assert kind == "events" and size == 1
    assert load == {
        "cmd": "_minion_event",
        "id": "syn-1",
        "events": [{"tag": BATCH, "data": {"v": 1}}],
        "pretag": None,
    }
    up.sent(kind, size)
    assert up.next_request() is None and not up.pending()


def test_a_jobs_targeted_minions_go_up_first_tagged_as_salt_syndic_sends_them():
    up = Uplink("syn-1", batch=10)
    new = "salt/job/20261130000000000007/new"
    up.take(BATCH, {"v": 1})
    up.take(*ret("20261130000000000007", "gw-1"))
    assert up.take(new, {"jid": "20261130000000000007", "minions": ["gw-1"], "fun": "test.ping"})
    # no minion list, a return-like event or a malformed list: not a job's targets
    assert not up.take(new, {"jid": "20261130000000000007"})
    assert not up.take(new, {"minions": ["gw-1"], "retcode": 0})
    assert not up.take(new, {"minions": "gw-1"})
    assert not up.take("salt/job/x/new", {"minions": ["gw-1"]})
    kind, load, size = up.next_request()
    assert (kind, size) == ("jobs", 1)
    assert load == {
        "cmd": "_minion_event",
        "id": "syn-1",
        "events": [
            {
                "tag": "syndic/syn-1/" + new,
                "data": {"jid": "20261130000000000007", "minions": ["gw-1"], "fun": "test.ping"},
            }
        ],
        "pretag": None,
    }
    up.sent(kind, size)
    assert [up.next_request()[0]] == ["returns"]
    assert up.counters["jobs_sent"] == 1
    # left to salt-syndic with the returns; with several top masters, only the named one's
    assert not Uplink("syn-1", returns=False).take(new, {"minions": ["gw-1"]})
    other = Uplink("syn-1", master_id="a:1")
    assert not other.take(new, {"minions": ["gw-1"], "master_id": "b:2"})
    assert other.take(new, {"minions": ["gw-1"], "master_id": "a:1"})


def test_a_failed_request_keeps_its_items_and_batches_are_bounded():
    up = Uplink("syn-1", batch=2)
    for i in range(5):
        up.take(BATCH, {"n": i})
    kind, load, size = up.next_request()
    assert size == 2 and [e["data"]["n"] for e in load["events"]] == [0, 1]
    # not answered: nothing leaves, the same request comes again
    assert up.next_request()[1] == load
    up.sent(kind, size)
    assert [e["data"]["n"] for e in up.next_request()[1]["events"]] == [2, 3]


def test_past_max_queue_the_oldest_are_dropped_and_counted():
    up = Uplink("syn-1", max_queue=3)
    for i in range(5):
        up.take(BATCH, {"n": i})
    assert [e["data"]["n"] for e in up.events] == [2, 3, 4]
    assert up.counters["events_dropped"] == 2


def test_returns_can_be_left_to_salt_syndic():
    up = Uplink("syn-1", returns=False)
    assert not up.take(*ret("1", "gw-1"))


def test_validate_names_the_key_and_never_raises():
    assert validate({}) == (True, "valid")
    assert validate({"returns": True, "max_queue": 10, "backoff": {"min_s": 1}})[0]
    for cfg, key in (
        ({"batch": 0}, "batch"),
        ({"max_queue": "x"}, "max_queue"),
        ({"returns": "yes"}, "returns"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"backoff": []}, "backoff"),
        ({"backoff": {"max_s": 0}}, "backoff.max_s"),
        ({"master_port": True}, "master_port"),
        ({"master": 1}, "master"),
        ({"bogus": 1}, "bogus"),
        ({"backoff": {"max": 3}}, "backoff.max"),
    ):
        ok, msg = validate(cfg)
        assert ok is False and key in msg, (cfg, msg)
    assert validate(None)[0] is False
    assert validate(object())[0] is False  # type: ignore[arg-type]


def test_parse_fills_in_the_defaults():
    cfg, errors = parse_uplink({"backoff": {"max_s": 5}})
    assert errors == [] and cfg.backoff.max_s == 5 and cfg.backoff.min_s == 0.5
    assert cfg.batch == 200 and cfg.returns and cfg == UplinkConfig(backoff=cfg.backoff)


class ScriptedChannel:
    """Answers requests, or raises while ``down`` (the top master unreachable)."""

    def __init__(self, sent: list, down: list) -> None:
        self.sent, self.down = sent, down

    def send(self, load, timeout, tries):
        if self.down and self.down[0]:
            raise TimeoutError("no answer")
        self.sent.append(load)

    def close(self):
        pass


def test_each_top_master_gets_every_event_and_only_its_own_job_returns():
    from saltext.tributary.syndic.uplink import Link

    cfg, _ = parse_uplink({})
    sent: dict[str, list] = {"a:1": [], "b:2": []}
    links = [
        Link(e, {"id": "syn-1"}, cfg, lambda o, e=e: ScriptedChannel(sent[e], []), several=True)
        for e in sent
    ]
    tag, data = ret("1", "gw-1")
    for link in links:
        link.up.take(BATCH, {"v": 1})
        link.up.take(tag, {**data, "master_id": "b:2"})
        link.up.take(*ret("2", "gw-1"))  # no master_id: everyone
        link.flush()
    cmds = {e: [load["cmd"] for load in loads] for e, loads in sent.items()}
    assert cmds == {
        "a:1": ["_syndic_return", "_minion_event"],
        "b:2": ["_syndic_return", "_minion_event"],
    }
    jids = {e: [r["jid"] for r in loads[0]["load"]] for e, loads in sent.items()}
    assert jids == {"a:1": ["2"], "b:2": ["1", "2"]}


def test_a_master_that_does_not_answer_keeps_its_queue_and_backs_off():
    from saltext.tributary.syndic.uplink import Link

    cfg, _ = parse_uplink({"backoff": {"min_s": 60, "max_s": 120}})
    sent: list = []
    down = [True]
    link = Link("a:1", {"id": "syn-1"}, cfg, lambda o: ScriptedChannel(sent, down))
    link.up.take(BATCH, {"v": 1})
    link.flush()
    assert sent == [] and len(link.up.events) == 1 and link.delay == 60
    down[0] = False
    link.flush()  # still backing off: nothing sent before next_try
    assert sent == []
    link.next_try = 0
    link.flush()
    assert len(sent) == 1 and not link.up.pending() and link.delay == 0
