"""The ``tributary`` runner and the relay/keys engines through Salt's own loaders (no daemons).

The runner reads the relay engine's configuration from the master opts and its spool (ledger,
counters) from disk; here the spool is filled with the library, as the engine would.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import salt.config
import salt.loader
import yaml

from saltext.tributary.relay.spool import RelaySpool

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def opts(tmp_path):
    o = salt.config.master_config(None)
    o.update(
        cachedir=str(tmp_path / "cache"),
        pki_dir=str(tmp_path / "pki"),
        runner_dirs=[str(REPO / "salt" / "_runners")],
        engines_dirs=[str(REPO / "salt" / "_engines")],
        engines=[
            {
                "tributary_relay": {
                    "elasticsearch": {"hosts": ["https://127.0.0.1:1"], "request_timeout": 2},
                    "spool_path": str(tmp_path / "relay.db"),
                }
            }
        ],
    )
    spool = RelaySpool(str(tmp_path / "relay.db"))
    spool.ledger.add_range("gw-1", "ep", 1, 100)
    spool.ledger.add_range("gw-1", "ep", 151, 200)
    spool.ledger.heartbeat("gw-1", "ep", 250)
    spool.ledger.add_range("gw-2", "ep2", 1, 10)
    spool.bump({"indexed": 160, "indexed@gw-1": 150, "dead_lettered@gw-2": 1})
    spool.close()
    return o


def test_runner_status_gaps(opts):
    runners = salt.loader.runner(opts)
    summary = runners["tributary.status"](check_es=False)
    assert "gateways" not in summary  # a fleet summary first
    assert summary["fleet"]["gateways"] == 2 and summary["fleet"]["open_gaps"] == 2
    assert [(w["gateway"], w["state"]) for w in summary["worst"]] == [("gw-1", "gaps")]
    assert list(runners["tributary.status"](check_es=False, gateway="gw-2")["gateways"]) == ["gw-2"]
    st = runners["tributary.status"](check_es=False, detail=True)
    gw1, gw2 = st["gateways"]["gw-1"], st["gateways"]["gw-2"]
    assert gw1["last_seq"] == 200 and gw1["open_gaps"] == 2 and gw1["missing"] == 50 + 50
    assert gw1["indexed"] == 150 and gw1["behind"] == 50
    assert gw2["dead_lettered"] == 1 and gw2["open_gaps"] == 0
    assert st["fleet"]["open_gaps"] == 2 and st["fleet"]["missing_readings"] == 100
    assert st["relay"]["counters"]["indexed"] == 160
    assert runners["tributary.gaps"]()["missing_readings"] == 100
    assert len(runners["tributary.gaps"](detail="True")) == 2
    gaps = runners["tributary.gaps"](gateway="gw-1")
    assert [(g["from"], g["to"], g["state"]) for g in gaps] == [
        (101, 150, "open"),
        (201, 250, "open"),
    ]


def test_runner_shows_key_sources_and_conflicts_and_retires_a_syndic(opts, tmp_path):
    """Two syndics claim one gateway: the second is a conflict, shown by tributary.status; the
    operator retires the first with tributary.retire_syndic, and can undo it."""
    spool = RelaySpool(str(tmp_path / "relay.db"))
    with spool.transaction():
        spool.keyring.take("syndic-1", 1_000, {"gw-a": "pem-a"}, 600_000)
        assert spool.keyring.take("syndic-2", 1_000, {"gw-a": "pem-x"}, 600_000).conflicts == 1
    spool.close()
    runners = salt.loader.runner(opts)
    fleet = runners["tributary.status"](check_es=False)["fleet"]
    assert fleet["key_sources"]["syndic-1"]["state"] == "live"
    assert fleet["key_sources"]["syndic-1"]["gateways"] == 1
    (conflict,) = fleet["key_conflicts"]
    assert (conflict["gateway"], conflict["claimed_by"]) == ("gw-a", "syndic-2")
    out = runners["tributary.retire_syndic"]("syndic-1")
    assert out["result"] and out["state"] == "retired" and out["gateway_keys"] == 1
    fleet = runners["tributary.status"](check_es=False)["fleet"]
    assert fleet["key_sources"]["syndic-1"] == {
        "gateways": 0,
        "state": "retired",
        "last_set_age_s": fleet["key_sources"]["syndic-1"]["last_set_age_s"],
    }
    assert runners["tributary.retire_syndic"]("syndic-1", undo=True)["state"] == "trusted again"


def test_runner_status_reports_unreachable_elasticsearch(opts):
    st = salt.loader.runner(opts)["tributary.status"]()
    assert st["result"] is False
    assert st["elasticsearch"]["reachable"] is False and st["elasticsearch"]["error"]


def test_runner_replay_needs_a_whole_range(opts):
    ret = salt.loader.runner(opts)["tributary.replay"]("gw-1", "ep", 5)
    assert ret["result"] is False and "from_seq" in ret["error"]


def test_runner_functions_have_cli_examples(opts):
    runners = salt.loader.runner(opts)
    for name in ("tributary.status", "tributary.gaps", "tributary.replay", "tributary.health"):
        assert "CLI Example" in runners[name].__doc__


def test_engines_validate_without_raising(opts):
    engines = salt.loader.engines(opts, {}, {}, {}, {})
    ok, msg = engines["tributary_relay.validate"]({"elasticsearch": {"hosts": "ftp://x"}})
    assert ok is False and "elasticsearch.hosts" in msg
    assert engines["tributary_relay.validate"](None)[0] is False
    assert engines["tributary_keys.validate"]({"interval": 0})[0] is False
    assert engines["tributary_keys.validate"]({"interval": 5}) == (True, "valid")
    assert engines["tributary_uplink.validate"]({"batch": 0})[0] is False
    ok, msg = engines["tributary_uplink.validate"]({"backoff": {"max": 3}})
    assert ok is False and "backoff.max" in msg


def engine_examples(name: str) -> list:
    """The engine configurations documented as YAML in the engine's module docstring."""
    text = (REPO / "salt" / "_engines" / f"{name}.py").read_text()
    doc = text.split('"""')[1]
    out = []
    for block in re.findall(r"::\n\n((?:(?: {4}.*)?\n)+)", doc):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "engines" in data:
            out += [e[name] for e in data["engines"] if name in e]
    return out


@pytest.mark.parametrize("name", ["tributary_relay", "tributary_keys", "tributary_uplink"])
def test_every_documented_engine_example_validates(opts, name):
    engines = salt.loader.engines(opts, {}, {}, {}, {})
    examples = engine_examples(name)
    assert examples, f"{name} documents no YAML example"
    for cfg in examples:
        ok, msg = engines[f"{name}.validate"](cfg)
        assert ok, (cfg, msg)


LOADER_MODULES = sorted((REPO / "salt").glob("_*/*.py"))


def _pyproject_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


@pytest.mark.parametrize("path", LOADER_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_loader_modules_are_for_the_installed_library(path, monkeypatch):
    """Each loader module names the library version it is written for; against another it
    refuses to load and says why (they are synced from the fileserver, apart from the package)."""
    import importlib.util

    import saltext.tributary as pkg

    assert pkg.__version__ == _pyproject_version()
    spec = importlib.util.spec_from_file_location(f"loader_{path.parent.name}_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.__tributary_version__ == pkg.__version__
    if getattr(mod, "HAS_LIBS", True):
        assert mod.__virtual__() == mod.__virtualname__
    monkeypatch.setattr(pkg, "__version__", "0.0.0-other")
    ok, reason = mod.__virtual__()
    assert ok is False
    assert f"is for saltext.tributary {mod.__tributary_version__} but 0.0.0-other" in reason


def _leaves(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict) and key != "elasticsearch":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_relay_docstring_example_shows_the_defaults():
    """The engine's documented example states the schema's defaults (one source of truth):
    every value it shows, but the site-specific Elasticsearch block and syndic ids, is the
    default."""
    from saltext.tributary.relay.config import RelayConfig
    from saltext.tributary.util import schema

    defaults = dict(_leaves(schema.defaults(RelayConfig)))
    example = engine_examples("tributary_relay")[0]  # the others: scale-out roles
    shown = dict(_leaves(example))
    es_shown = shown.pop("elasticsearch")
    for key in ("replicas", "shards", "request_timeout", "verify_certs"):  # not site-specific
        if key in es_shown:
            assert es_shown[key] == defaults["elasticsearch"][key], f"elasticsearch.{key}"
    assert shown.pop("trusted_syndics") == ["syndic-1"] and defaults["trusted_syndics"] is None
    assert shown, "the example shows no option"
    for key, value in shown.items():
        assert key in defaults, f"{key}: documented but not an option"
        assert value == defaults[key], f"{key}: documented {value!r}, default {defaults[key]!r}"
